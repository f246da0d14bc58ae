"""``mergeit batch-status OUT``: where a ``--batch`` run stands, from its state file and the provider."""

from __future__ import annotations

from pathlib import Path

from mergeit_hf.endpoints.batch.api import BatchApi
from mergeit_hf.endpoints.batch.state import BatchState
from mergeit_hf.endpoints.http.transport import api_key
from mergeit_hf.endpoints.sending.sync import run_sync
from mergeit_hf.run.batch_rounds import BATCH_FOLDER


def batch_status(output: Path, ask_provider: bool = True) -> str:
    """One line per round and per batch file; the provider's status and counts of the round in flight."""
    state = BatchState.read(output / BATCH_FOLDER)
    lines = [f"batch API at {state.endpoint}: {len(state.rounds)} round(s); {len(state.given_up)} request(s) given up"]
    for record in state.rounds:
        where = "in flight" if not record.done else "done"
        roles = ", ".join(f"{role} {n}" for role, n in record.by_role.items())
        lines.append(
            f"round {record.round} ({where}): {record.requests} requests ({roles}); {record.answered} answered, "
            f"{record.failed_lines} failed lines, {record.unanswered} unanswered, {record.format_refused} refused "
            f"their response_format ({record.structured_output}), {record.queue_refused} batch(es) refused for the "
            f"enqueued-token limit; tokens {record.prompt_tokens} / "
            f"{record.completion_tokens}"
        )
        for part in record.files:
            lines.append(
                f"  {part.name}: {part.requests} requests, batch {part.batch_id or '(not created)'}, {part.status}"
            )
    flying = state.in_flight
    if flying is not None and ask_provider:
        lines += run_sync(_provider_lines(state, [p.batch_id for p in flying.files if p.batch_id]))
    return "\n".join(lines)


async def _provider_lines(state: BatchState, batch_ids: list[str]) -> list[str]:
    api = BatchApi(
        state.endpoint, api_key("MERGEIT_API_KEY"), key_variable="MERGEIT_API_KEY", timeout_s=60.0, attempts=3
    )
    try:
        lines = []
        for batch_id in batch_ids:
            batch = await api.get(batch_id)
            counts = ", ".join(f"{name} {n}" for name, n in batch.counts.items())
            lines.append(f"  the provider says {batch_id} is {batch.status} ({counts})")
        return lines
    finally:
        await api.aclose()
