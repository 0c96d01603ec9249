"""LightningModules of the stages: CTRModule (Base / Retrain) and SearchModule (iHAS search)."""
