"""`cxrray export --format diffusers`: a trained model as diffusers `save_pretrained` folders (the
family's denoiser and scheduler, plus any part diffusers has no class for, saved beside them and
named in the export's README.md), loadable with diffusers' own `from_pretrained`."""
from __future__ import annotations

import json
from pathlib import Path

from cxrray.models.loading import load_model


def export_diffusers(uri: str, output: str | Path) -> dict:
    """Export the model at `uri` (checkpoint, run output or MLflow URI) into folder `output`."""
    loaded = load_model(uri)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    notes = loaded.family.export(loaded.model, out)
    (out / "cxrray_model.json").write_text(json.dumps(
        {"identity": loaded.identity, "model": loaded.model.cfg.model_dump(mode="json")}, indent=1, sort_keys=True))
    lines = [f"# {loaded.identity['name']} ({loaded.identity['version']}) as diffusers folders", "",
             "- `unet/`: `diffusers.UNet2DModel.from_pretrained(...)`",
             "- `scheduler/`: the noise schedule it was trained with (`from_pretrained`)",
             "- `cxrray_model.json`: cxrray's config and identity", "",
             "Not expressible in diffusers' classes (saved beside, as safetensors):", ""]
    lines += [f"- {note}" for note in notes] or ["- nothing"]
    lines += ["", "Every image this model generates is synthetic."]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    return {"output": str(out), "family": loaded.family.name, "not_in_diffusers": notes,
            "folders": sorted(p.name for p in out.iterdir() if p.is_dir())}
