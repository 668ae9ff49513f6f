"""A small tabular model for `benchmarks/pipeline.py --config benchmarks/tabular.yaml`: scikit-learn's wine
data (178 rows, 13 named columns from about 0.1 to 1,680, three cultivars) as a user's DataFrame would be."""

import pandas as pd
from torch import nn

label = "cultivar"
preprocess = "standardize"


def load_data() -> pd.DataFrame:
    from sklearn.datasets import load_wine

    bunch = load_wine(as_frame=True)
    return bunch.data.assign(cultivar=bunch.target.map({0: "barolo", 1: "grignolino", 2: "barbera"}))


def build(input_shape: tuple[int, ...], num_classes: int, hidden: int = 32) -> nn.Module:
    return nn.Sequential(nn.Linear(input_shape[0], hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
