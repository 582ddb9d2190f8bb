"""The head atlas: every (tower, layer, head) as one feature vector, embedded in 2-D, clustered, and
labelled with roles by explicit rules.

Features (averaged over the store's examples, one condition or all):
- from `head_stats`: every statistic, one column per (stat, role) - e.g. `mass:bos`, `mass:image`,
  `entropy`, `distance`, `distance_rms`, `alpha:pos:0`; a role a tower never has is 0 for mass and the
  column mean otherwise;
- from stored full attention patterns (compact capture), where present for the first `pattern_examples`
  examples: `prev_token` = mean_q A[q, q-1] (q >= 1), `first_token` = mean_q A[q, 0], `self` = mean_q A[q, q];
- `induction`, when scores are given (e.g. a stored result with layer, head and an `induction` column);
- long-context scores, when results are given (headlab.analyses.retrieval / longctx): `retrieval_score`
  (Wu et al.), `streaming` (DuoAttention-style, binarised), `echo` and `induction` (RazorAttention's masks,
  per repeated query: the attention from a token to its earlier occurrences / to the tokens after them).

Choices: features are standardised (z-scores; constant columns become 0); the embedding is UMAP
(umap-learn, n_neighbors = min(15, n_heads - 1), random_state = seed) when there are more heads than
`n_neighbors` + 1 needs, else PCA (sklearn) - `embedding` says which, e.g. the 8 heads of the zoo LM get
PCA; clusters are KMeans (k = min(clusters, n_heads), random_state = seed, n_init = 10) on the
standardised features, not on the 2-D embedding.

Role rules (a head can have several; joined by "+", "other" when none):
- sink: alpha of the first token (`alpha:pos:0`) > 0.3 (Gu et al.'s threshold);
- previous-token: `prev_token` > 0.4 from patterns; without patterns (an approximation), 0.75 <=
  distance <= 1.5 and entropy < 1 nat (sharp attention about one token back);
- induction: the given induction score > 0.3 (one definition: the mean attention from a repeated token to
  the token after its earlier occurrence, e.g. the `razor-heads` result's `induction` column);
- echo: the `echo` score > 0.3 (the same, to the earlier occurrence itself);
- retrieval: `retrieval_score` > 0.1 (Wu et al.'s threshold);
- streaming: DuoAttention's binarised `streaming` flag (the KV head keeps only sink + recent keys);
- positional: mean attended distance < 1.5 (tokens or patches) and not a previous-token head (local);
- vision-aware: `mass:image` > 0.5 (LVLM language heads that read the image tokens).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from headlab.analyses.registry import Analysis, Option, StoreValues
from headlab.errors import SelectionError, StoreError
from headlab.store import Store

KEY = ["tower", "layer", "head"]
SINK_ALPHA = 0.3
PREV_TOKEN = 0.4
INDUCTION = 0.3
ECHO = INDUCTION  # same units as induction: attention per repeated query
RETRIEVAL = 0.1
LONG_CONTEXT_COLUMNS = ("retrieval_score", "streaming", "echo", "induction")
LOCAL_DISTANCE = 1.5
IMAGE_MASS = 0.5
N_NEIGHBORS = 15


def stat_features(store: Store, *, condition: str | None = None) -> pd.DataFrame:
    """One row per (tower, layer, head): every head statistic averaged over examples, one column per
    (stat, role) ("stat" alone when the statistic has no role)."""
    missing = condition is not None and condition not in store.conditions()
    stats = pd.DataFrame() if missing else store.head_stats(condition=condition)
    if not len(stats):
        raise StoreError(
            f"{store.root} holds no head statistics{f' for condition {condition!r}' if condition else ''}; "
            "capture with stats=hl.Stats()"
        )
    stats = stats[stats.step == 0]
    name = stats.stat.where(stats.role.fillna("") == "", stats.stat + ":" + stats.role.fillna(""))
    wide = stats.assign(feature=name).pivot_table(
        index=KEY, columns="feature", values="value", aggfunc="mean"
    )
    wide.columns.name = None
    mass = [c for c in wide.columns if c.startswith(("mass:", "mass_last:"))]
    wide[mass] = wide[mass].fillna(0.0)
    return wide.fillna(wide.mean()).fillna(0.0).reset_index()


def pattern_features(store: Store, *, condition: str = "default", pattern_examples: int = 8) -> pd.DataFrame:
    """prev_token, first_token and self per (tower, layer, head) from full stored patterns of the first
    `pattern_examples` examples; an empty frame when the store holds no full patterns."""
    if condition not in store.conditions():  # asking the store for a condition it lacks is an error
        return pd.DataFrame(columns=KEY)
    ex = store.examples(condition=condition)
    if not len(ex):
        return pd.DataFrame(columns=KEY)
    heads = store.head_stats(condition=condition, stat="entropy")[KEY].drop_duplicates()
    rows = []
    for tower, layer, head in heads.itertuples(index=False):
        found = []
        for example in sorted(ex.example.unique())[:pattern_examples]:
            try:
                a = store.pattern(example, int(layer), int(head), tower=tower, condition=condition)
            except StoreError:
                continue
            if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 2:
                continue  # only the rows of some queries: not the whole pattern
            q = np.arange(1, a.shape[0])
            found.append((a[q, q - 1].mean(), a[q, 0].mean(), np.diag(a)[1:].mean()))
        if found:
            prev, first, own = np.mean(found, 0)
            rows.append(
                {
                    "tower": tower,
                    "layer": layer,
                    "head": head,
                    "prev_token": prev,
                    "first_token": first,
                    "self": own,
                }
            )
    return (
        pd.DataFrame(rows, columns=[*KEY, "prev_token", "first_token", "self"])
        if rows
        else pd.DataFrame(columns=KEY)
    )


def head_roles(features: pd.DataFrame) -> pd.Series:
    """The rule-based role label of each row of a feature frame (module docstring)."""

    def col(name: str) -> pd.Series:
        return features[name] if name in features else pd.Series(np.nan, index=features.index)

    dist = col("distance")
    prev = np.where(
        col("prev_token").notna(),
        col("prev_token") > PREV_TOKEN,
        (dist >= 0.75) & (dist <= 1.5) & (col("entropy") < 1.0),
    )
    rules = {
        "sink": col("alpha:pos:0") > SINK_ALPHA,
        "previous-token": pd.Series(prev, index=features.index),
        "induction": col("induction") > INDUCTION,
        "echo": col("echo") > ECHO,
        "retrieval": col("retrieval_score") > RETRIEVAL,
        "streaming": col("streaming").fillna(0).astype(float) > 0.5,
        "positional": (dist < LOCAL_DISTANCE) & ~pd.Series(prev, index=features.index),
        "vision-aware": col("mass:image") > IMAGE_MASS,
    }
    labels = [[name for name, hit in rules.items() if bool(hit.iloc[i])] for i in range(len(features))]
    return pd.Series(["+".join(found) or "other" for found in labels], index=features.index)


def embed(x: np.ndarray, *, seed: int = 0, n_neighbors: int = N_NEIGHBORS) -> tuple[np.ndarray, str]:
    """([n, 2] coordinates, "umap" or "pca"): UMAP when n > n_neighbors + 1, else PCA (UMAP's spectral
    initialisation and neighbour graph need more points than neighbours)."""
    n = len(x)
    if n < 2:
        return np.zeros((n, 2)), "none"
    if n > n_neighbors + 1:
        import umap

        model = umap.UMAP(n_components=2, n_neighbors=n_neighbors, random_state=seed, n_jobs=1)
        return model.fit_transform(x), "umap"
    from sklearn.decomposition import PCA

    k = min(2, x.shape[1], n)
    xy = PCA(n_components=k, random_state=seed).fit_transform(x)
    return np.pad(xy, ((0, 0), (0, 2 - k))), "pca"


def atlas_from_features(features: pd.DataFrame, *, clusters: int = 4, seed: int = 0) -> pd.DataFrame:
    """Standardise the feature columns of `features` (tower, layer, head + numbers), embed, cluster and
    label: (tower, layer, head, x, y, cluster, role, embedding, features...)."""
    from sklearn.cluster import KMeans

    missing = set(KEY) - set(features)
    if missing or not len(features):
        raise SelectionError(f"atlas features need rows and the columns {KEY}; missing {sorted(missing)}")
    numeric = [c for c in features.columns if c not in KEY]
    values = features[numeric].to_numpy(dtype=float)
    std = values.std(0)
    z = (values - values.mean(0)) / np.where(std > 0, std, 1.0)  # [head, feature]
    xy, method = embed(z, seed=seed)
    k = max(1, min(clusters, len(z)))
    labels = KMeans(n_clusters=k, random_state=seed, n_init=10).fit_predict(z) if len(z) > 1 else [0]
    out = features[KEY].copy()
    out["x"], out["y"], out["cluster"] = xy[:, 0], xy[:, 1], np.asarray(labels, dtype=int)
    out["role"] = head_roles(features)
    out["embedding"] = method
    return pd.concat([out, features[numeric]], axis=1).reset_index(drop=True)


def head_atlas(
    store: Store,
    *,
    condition: str | None = None,
    induction: Mapping[tuple[str, int, int], float] | None = None,
    clusters: int = 4,
    seed: int = 0,
    pattern_examples: int = 8,
    scores: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The atlas of every head in `store` (module docstring). induction: {(tower, layer, head): score}.
    scores: per-head long-context scores (layer, head, tower optional, and any of `LONG_CONTEXT_COLUMNS`),
    e.g. the results of `retrieval-heads`, `streaming-heads` and `razor-heads` joined
    (`long_context_scores`)."""
    features = stat_features(store, condition=condition)
    patterns = pattern_features(store, condition=condition or "default", pattern_examples=pattern_examples)
    if len(patterns):
        features = features.merge(patterns, on=KEY, how="left")
    if induction:
        score = [
            induction.get((t, int(la), int(h)), np.nan) for t, la, h in features[KEY].itertuples(index=False)
        ]
        features["induction"] = pd.Series(score, index=features.index).fillna(0.0)
    if scores is not None and len(scores):
        features = _with_scores(features, scores)
    return atlas_from_features(features.sort_values(KEY).reset_index(drop=True), clusters=clusters, seed=seed)


def _with_scores(features: pd.DataFrame, scores: pd.DataFrame) -> pd.DataFrame:
    """`features` with the long-context score columns of `scores` (absent heads: 0 / False); an induction
    column the features already have (the `induction` option) is kept."""
    scores = scores.assign(tower=scores.tower if "tower" in scores else "lm")
    missing = {"layer", "head"} - set(scores)
    if missing:
        raise SelectionError(f"long-context scores need layer and head columns; missing {sorted(missing)}")
    cols = [
        c for c in LONG_CONTEXT_COLUMNS if c in scores and (c != "induction" or "induction" not in features)
    ]
    merged = features.merge(scores[KEY + cols].drop_duplicates(KEY), on=KEY, how="left")
    for c in cols:
        merged[c] = merged[c].astype(float).fillna(0.0)
    return merged


def long_context_scores(store: Store, names) -> pd.DataFrame | None:
    """The stored results `names` (None entries skipped) joined on (tower, layer, head), keeping the
    long-context score columns."""
    frames = []
    for name in names:
        if name is None:
            continue
        found = store.result(name)
        found = found.assign(tower=found.tower if "tower" in found else "lm")
        cols = [c for c in LONG_CONTEXT_COLUMNS if c in found]
        if not cols:
            raise StoreError(f"result {name!r} has none of the columns {LONG_CONTEXT_COLUMNS}")
        frames.append(found[KEY + cols].drop_duplicates(KEY))
    if not frames:
        return None
    out = frames[0]
    for f in frames[1:]:
        out = out.merge(f[[c for c in f.columns if c not in out.columns or c in KEY]], on=KEY, how="outer")
    return out


def _run(store: Store, options: dict) -> pd.DataFrame:
    induction = None
    if options["induction"] is not None:
        found = store.result(options["induction"])
        column = "induction" if "induction" in found else "score"
        if column not in found:
            raise StoreError(f"result {options['induction']!r} has neither an induction nor a score column")
        tower = found.tower if "tower" in found else pd.Series("lm", index=found.index)
        induction = {
            (t, int(la), int(h)): float(s)
            for t, la, h, s in zip(tower, found.layer, found["head"], found[column], strict=True)
        }
    return head_atlas(
        store,
        condition=options["condition"],
        induction=induction,
        clusters=options["clusters"],
        seed=options["seed"],
        scores=long_context_scores(store, (options["retrieval"], options["streaming"], options["razor"])),
    )


ANALYSES = {
    "atlas": Analysis(
        name="atlas",
        description=(
            "Head atlas: per-head statistics (+ stored-pattern features), standardised, UMAP (PCA for few "
            "heads) and KMeans, with rule-based roles (sink, previous-token, induction, positional, "
            "vision-aware; with long-context results: retrieval, streaming, echo)"
        ),
        run=_run,
        options={
            "condition": Option(
                type=str,
                default=None,
                optional=True,
                among=StoreValues.CONDITIONS,
                help="condition to use (none: all conditions pooled)",
            ),
            "clusters": Option(
                type=int, default=4, ge=1, help="KMeans clusters (at most one per head: fewer heads, fewer)"
            ),
            "seed": Option(type=int, default=0, ge=0, help="random_state of UMAP and KMeans"),
            "induction": Option(
                type=str,
                default=None,
                optional=True,
                among=StoreValues.RESULTS,
                help="a stored result with layer, head and an induction (or score) column",
            ),
            **{
                name: Option(
                    type=str,
                    default=None,
                    optional=True,
                    among=StoreValues.RESULTS,
                    help=f"a stored {name}-heads result (long-context roles: {what})",
                )
                for name, what in (
                    ("retrieval", "retrieval"),
                    ("streaming", "streaming"),
                    ("razor", "echo, induction"),
                )
            },
        },
    )
}
