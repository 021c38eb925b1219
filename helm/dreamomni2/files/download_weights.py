"""Fill a weights folder once from the Hugging Face Hub; the chart's download Job runs this.

    python download_weights.py --spec spec.json --target /models/sets/<id>

`spec.json` names what to fetch, one entry per sub-folder of the target:
`{"base": {"repo", "revision", "allowPatterns", "ignorePatterns"}, "adapters": {...}}`. The workers read
`<target>/base` (the diffusers FLUX.1 Kontext folder) and `<target>/adapters` (`edit_lora/`, `gen_lora/`,
`vlm-model/`), and wait for `<target>/.complete`, written last: a half-finished download is never used,
and a rerun (Job retry, new pod) resumes it, skipping files already there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

MARKER = ".complete"


def download(spec: dict[str, dict], target: Path) -> bool:
    """Download every entry of `spec` under `target`; False when it was already complete."""
    marker = target / MARKER
    if marker.exists():
        return False
    from huggingface_hub import snapshot_download

    token = os.environ.get("HF_TOKEN") or None
    if token is None:
        print("HF_TOKEN is not set: gated repositories (FLUX.1 Kontext [dev]) will refuse the download")
    for folder, entry in spec.items():
        print(f"{entry['repo']}@{entry['revision']} -> {target / folder}", flush=True)
        snapshot_download(
            repo_id=entry["repo"],
            revision=entry["revision"],
            local_dir=target / folder,
            allow_patterns=entry.get("allowPatterns") or None,
            ignore_patterns=entry.get("ignorePatterns") or None,
            token=token,
        )
    marker.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", type=Path, required=True, help="JSON file naming the repositories")
    parser.add_argument("--target", type=Path, required=True, help="folder to fill")
    args = parser.parse_args(argv)
    spec = json.loads(args.spec.read_text())
    args.target.mkdir(parents=True, exist_ok=True)
    if download(spec, args.target):
        print(f"weights complete in {args.target}")
    else:
        print(f"weights already complete in {args.target}; nothing to do")
    return 0


if __name__ == "__main__":
    sys.exit(main())
