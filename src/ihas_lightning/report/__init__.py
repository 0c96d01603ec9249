"""The paper's tables and figures from run dirs: evaluate's results table (``tables``), Table 2 / Figure 4
(``table2``), Tables 3 and 4 (``ablation``), the sweep report (``build``, ``callback``)."""
