"""Network-namespace labs that reproduce broken Service connections for hairtrace to diagnose."""
