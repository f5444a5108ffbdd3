"""The web app's tabs: one module per tab, each `create_<tab>(...)`; wiring only."""
