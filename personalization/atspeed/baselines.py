"""What a recommendation user would otherwise pick, fitted on the same training sequences as the
trained target and scored on the same held-out users:

- `MostPopular`: the items bought most often in training, the same list for everyone (fitted on
  the validation period's purchases it is "recent popular");
- `Content`: the catalogue items whose titles are nearest (TF-IDF cosine) to the user's last few
  purchases — no training at all, and the bar on Beauty, where most test items were never bought
  before and much of the signal is lexical (brand, product line);
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


class Content:
    """Items nearest to the last `recent` purchases: cosine of TF-IDF over title 1–2-grams."""

    name = "content (TF-IDF)"

    def __init__(self, titles: Sequence[str], recent: int = 3, exclude_seen: bool = False):
        from sklearn.feature_extraction.text import TfidfVectorizer

        if recent < 1:
            raise ConfigError("the content baseline reads at least one recent item")
        self.titles = list(dict.fromkeys(titles))
        self.index = {t: i for i, t in enumerate(self.titles)}
        self.vectors = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit_transform(
            self.titles
        )
        self.recent, self.exclude_seen = recent, exclude_seen

    def recommend(self, history: Sequence[str], k: int) -> list[str]:
        import numpy as np

        known = [self.index[t] for t in history[-self.recent :] if t in self.index]
        if not known:
            return []
        profile = self.vectors[known].sum(axis=0)
        scores = np.asarray(self.vectors @ np.asarray(profile).ravel()).ravel()
        if self.exclude_seen:
            scores[[self.index[t] for t in history if t in self.index]] = -np.inf
        top = np.argsort(-scores, kind="stable")[:k]
        return [self.titles[i] for i in top]
