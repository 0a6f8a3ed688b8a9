"""One module per stage (bench is a package); stages talk through bundle files."""
