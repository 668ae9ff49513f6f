"""The mlgate job: config → train → benchmark → optimize → gate → promote → report."""
