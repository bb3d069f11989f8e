"""The resume journal of `slta merge --resume`: which tensor groups of OUT.partial are durably written,
and for the closed form the modules solved and the Gram statistics gathered so far. The work per
layer is deterministic, so a resumed run writes the same bytes as an uninterrupted one. The journal
records the inputs' fingerprints (slta.io.output.input_fingerprint): a partial merge of inputs that
changed since is refused, never continued with a mix of old and new layers.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from slta.io.inputs import MergeError

if TYPE_CHECKING:
    from slta.io.checkpoint import ShardedWriter

log = logging.getLogger("slta")


class Journal:
    """Progress of a resumable merge (`--resume`), kept in OUT.partial: the groups of tensors that are
    durably written, and for slta the solved modules and the Gram statistics so far. Without a
    folder (a run without --resume) every method is a no-op."""

    FILE, GRAMS = "slta_progress.json", "slta_progress_grams.safetensors"

    def __init__(self, folder: Path | None, fingerprint: str, inputs: dict[str, str] | None = None):
        self.folder, self.fingerprint, self.inputs = folder, fingerprint, inputs
        self.done: list[str] = []
        self.modules: dict[str, dict] = {}
        if folder is None or not (folder / self.FILE).exists():
            return
        saved = json.loads((folder / self.FILE).read_text())
        if saved.get("fingerprint") != fingerprint:
            log.warning("%s holds a partial merge of a different config; starting over", folder)
            for f in folder.iterdir():
                f.unlink() if f.is_file() else shutil.rmtree(f)
            return
        old = saved.get("inputs")
        if inputs is not None and old is not None and old != inputs:
            changed = [p for p in sorted(set(old) | set(inputs)) if old.get(p) != inputs.get(p)]
            raise MergeError(f"{folder} holds a partial merge of inputs that changed since: {changed[0]}"
                             + (f" (and {len(changed) - 1} more)" if len(changed) > 1 else "")
                             + f"; its finished layers cannot be mixed with new ones: delete {folder} to start "
                             "over, or run without --resume")
        self.done, self.modules = saved["done"], saved.get("modules", {})
        if self.done:
            log.info("resuming: %d of the tensor groups were already written (%s ... %s)", len(self.done),
                     self.done[0], self.done[-1])

    @property
    def resuming(self) -> bool:
        """True when an earlier run's groups are kept (the writer then reopens its shards)."""
        return bool(self.done)

    def grams(self) -> dict[str, torch.Tensor]:
        """The Gram statistics saved with the last finished group ({} when none)."""
        if self.folder is None or not (self.folder / self.GRAMS).exists():
            return {}
        from safetensors.torch import load_file

        return load_file(self.folder / self.GRAMS)

    def mark(self, label: str, writer: ShardedWriter, modules: dict[str, dict] | None = None,
             grams: dict[str, torch.Tensor] | None = None) -> None:
        """Record that group `label` is written (after flushing the writer), with the modules solved in it."""
        if self.folder is None:
            return
        writer.flush()  # the tensors first, then the record that says they are there
        if grams is not None:
            tmp = self.folder / (self.GRAMS + ".tmp")
            save_file({k: v.cpu().contiguous() for k, v in grams.items()}, str(tmp))
            tmp.replace(self.folder / self.GRAMS)
        self.done.append(label)
        self.modules.update(modules or {})
        tmp = self.folder / (self.FILE + ".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "inputs": self.inputs, "done": self.done,
                                   "modules": self.modules}))
        tmp.replace(self.folder / self.FILE)

    def close(self) -> None:
        """Remove the journal's files (the merge is complete)."""
        if self.folder is not None:
            for name in (self.FILE, self.GRAMS):
                (self.folder / name).unlink(missing_ok=True)


