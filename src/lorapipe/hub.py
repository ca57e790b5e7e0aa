"""Push a folder (the merged model) to the Hugging Face Hub, with `huggingface_hub`'s own API.

The token comes only from the environment (`HF_TOKEN`), read when the push is checked
and handed straight to `HfApi`; it is never written to a file, a report or a message (errors
from the hub are shown with it blanked out). A dry run lists what would be uploaded and makes
no network call.
"""

from __future__ import annotations

from pathlib import Path

from lorapipe.errors import PipelineError
from lorapipe.models import hub_token


class HubPushError(PipelineError, RuntimeError):
    """The push cannot start (no token) or the hub refused it; the message says which."""


def push_token() -> str:
    """The write token from the environment (`lorapipe.models.hub_token`: HF_TOKEN, then
    HUGGING_FACE_HUB_TOKEN); raises HubPushError when there is none."""
    token = hub_token()
    if not token:
        raise HubPushError(
            "merge.push_to_hub is true but the HF_TOKEN environment variable is not set: "
            "export a write token as HF_TOKEN (it is read only from the environment), or "
            "set merge.push_dry_run: true to see what would be uploaded"
        )
    return str(token)


def upload_plan(folder: Path) -> list[tuple[str, int]]:
    """(path relative to `folder`, bytes) of every file `upload_folder` would send, sorted."""
    return sorted(
        (p.relative_to(folder).as_posix(), p.stat().st_size)
        for p in folder.rglob("*")
        if p.is_file()
    )


def describe_plan(folder: Path, repo_id: str) -> str:
    """The dry run's listing: one line per file with its size, and the total."""
    plan = upload_plan(folder)
    lines = [f"dry run: would upload {len(plan)} files from {folder} to {repo_id}:"]
    lines += [f"  {size / 2**20:10.2f} MiB  {name}" for name, size in plan]
    lines.append(f"  {sum(size for _, size in plan) / 2**20:10.2f} MiB  total")
    return "\n".join(lines)


def push_folder(folder: Path, repo_id: str, *, token: str, private: bool) -> str:
    """Create `repo_id` (a model repo; kept as is if it exists) and upload `folder` to it in one
    commit. Returns the commit URL; raises HubPushError naming the repo on any hub error."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message="Upload merged model (lorapipe merge stage)",
        )
    except Exception as exc:  # network, auth, offline mode: all reach the user the same way
        message = str(exc).replace(token, "***")
        raise HubPushError(
            f"merge.hub_repo_id: pushing {folder} to {repo_id} failed "
            f"({type(exc).__name__}: {message}); the merged model is kept in {folder}"
        ) from None
    return str(commit.commit_url)
