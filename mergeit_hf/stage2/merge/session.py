"""What stage 2 holds open while it sends: the request cache, the merge scheduler, the quality scorer and
the judge; and the retention model and complexity scorer a run builds from it."""

from __future__ import annotations

from dataclasses import dataclass, field

from mergeit_hf.config import MergeItConfig
from mergeit_hf.embeddings.batcher import EmbeddingBatcher
from mergeit_hf.embeddings.embedder import Embedder
from mergeit_hf.embeddings.static import StaticEmbedder
from mergeit_hf.endpoints.sending.limit import EndpointLoad
from mergeit_hf.endpoints.sending.request_cache import RequestCache
from mergeit_hf.endpoints.sending.scheduler import RequestScheduler
from mergeit_hf.prompts import PromptTemplate
from mergeit_hf.stage2.scoring.judge import Judge
from mergeit_hf.stage2.scoring.scorer import QualityScorer


@dataclass
class Session:
    """What stage 2 holds open while it sends: the request cache, the merge scheduler and the quality
    scorer (on its own scheduler when a scorer endpoint is set). Opened by ``Merger.session()``."""

    cache: RequestCache
    merges: RequestScheduler | None  # None in a scoring-only session
    scorer: QualityScorer
    judge: Judge | None = None  # with ``judge``
    loads: dict[str, EndpointLoad] = field(default_factory=dict)  # each endpoint's limit and counts
    # The retention model: loaded by the session's first merge call (not per batch, nor while the first
    # answers wait, nor by a session that only checks the endpoints)
    retention: EmbeddingBatcher | None = None

    @property
    def merge_model(self) -> str:
        """The merge model as the card shows it (a local path's file name, never the user's folders)."""
        return self.merges.backend.describe()["model"] if self.merges else ""

    @property
    def quality_model(self) -> str:
        return self.scorer.scheduler.backend.describe()["model"]

    def endpoints(self) -> dict[str, dict[str, str]]:
        """What each endpoint is and how it was spoken to (kind, model, structured output or route), its
        limit and what it was sent."""
        described = {"merge": _described(self.merges)} if self.merges else {}
        if self.scorer.raw:
            described["scorer"] = _described(self.scorer.scheduler)
        if self.judge is not None:
            described["judge"] = {**self.judge.describe(), **self.judge.scheduler.load.describe()}
        return described

    @property
    def requests_sent(self) -> int:
        judging = self.judge.scheduler if self.judge else None
        schedulers = {id(s): s for s in (self.merges, self.scorer.scheduler, judging) if s is not None}
        return sum(s.requests_sent for s in schedulers.values())


def _described(scheduler: RequestScheduler) -> dict[str, str]:
    return {**scheduler.backend.describe(), **scheduler.load.describe()}


def retention_embeddings(config: MergeItConfig) -> EmbeddingBatcher | None:
    """The retention model (static vectors distilled from the stage 1 model, unless ``retention_model``
    names a transformer), behind a batcher; None with ``compute_retention`` off."""
    if not config.compute_retention:
        return None
    if config.retention_model is None:
        return EmbeddingBatcher(StaticEmbedder(config.embedding_model))
    return EmbeddingBatcher(Embedder(config.retention_model, config.text_columns, config.embedding_batch_size))


def complexity_scorer(session: Session) -> QualityScorer | None:
    """Deita's complexity prompt on the scorer's scheduler, when ``complexity_scores`` asks for it."""
    config = session.scorer.config
    if not config.complexity_scores:
        return None
    return session.scorer.with_template(PromptTemplate.load(config.complexity_template))
