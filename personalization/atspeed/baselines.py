"""What a recommendation user would otherwise pick, fitted on the same training sequences as the
trained target and scored on the same held-out users:

- `MostPopular`: the items bought most often in training, the same list for everyone;
- `Sequential`: SASRec (Kang & McAuley, 2018) or GRU4Rec (Hidasi et al., 2016) from Cornac, a
  maintained library whose wheel installs here with numpy, scipy and torch only (RecBole pins
  old numpy / torch; RePlay pulls Spark-era dependencies). Items are titles; an item never bought
  in training has no embedding, so it is neither recommended nor read from a history.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from personalization.errors import ConfigError


class MostPopular:
    name = "most popular"

    def __init__(self, sequences: Sequence[Sequence[str]]):
        self.ranking = [item for item, _ in Counter(t for s in sequences for t in s).most_common()]

    def recommend(self, history: Sequence[str], k: int) -> list[str]:
        return self.ranking[:k]


class Sequential:
    """A Cornac next-item model fitted on purchase sequences (one session per user)."""

    def __init__(self, sequences: Sequence[Sequence[str]], model: str = "sasrec", **options):
        import numpy as np
        from cornac.data import SequentialDataset
        from cornac.models import GRU4Rec, SASRec

        models = {"sasrec": SASRec, "gru4rec": GRU4Rec}
        if model not in models:
            raise ConfigError(f"unknown sequential model {model!r}; one of {', '.join(models)}")
        self.name = {"sasrec": "SASRec", "gru4rec": "GRU4Rec"}[model] + " (Cornac)"
        rows = [(f"s{u}", item, t) for u, seq in enumerate(sequences) for t, item in enumerate(seq)]
        data = SequentialDataset.build(rows, fmt="SIT", seed=options.get("seed", 0))
        self.model = models[model](**options).fit(data)
        self.iid = data.iid_map  # title → index
        self.titles = np.array(sorted(self.iid, key=self.iid.get), dtype=object)

    def recommend(self, history: Sequence[str], k: int) -> list[str]:
        import numpy as np

        known = [self.iid[t] for t in history if t in self.iid]
        scores = np.asarray(self.model.score(None, known), dtype=float).reshape(-1)
        scores = scores[: len(self.titles)]
        top = np.argsort(-scores, kind="stable")[:k]
        return list(self.titles[top])
