"""Model cards: a README.md in every checkpoint and registered model, in the words a user needs before
using it (what it is, what data, how far trained, how it measured, what it is for, that outputs are synthetic)."""
from __future__ import annotations

import json


def model_card(family: str, description: str, model_cfg: dict, data: dict, images_shown: int, metrics: dict) -> str:
    """Markdown text. `data`: {uri, manifest_sha256, label_vocabulary, vocabulary_version, samples}."""
    shown_metrics = "\n".join(f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items())
                              if isinstance(v, (int, float)) and k not in ("images_shown", "step")) or "| (none yet) | |"
    return f"""# cxrray-{family}

{description}

| | |
|---|---|
| family | `{family}` |
| images shown | {images_shown:,} |
| data | `{data.get('uri')}` ({data.get('samples', '?')} samples) |
| data manifest sha256 | `{data.get('manifest_sha256')}` |
| label vocabulary version | `{data.get('vocabulary_version')}` ({len(data.get('label_vocabulary') or [])} labels) |

## Evaluation at this checkpoint

| metric | value |
|---|---|
{shown_metrics}

## Intended use

Research on chest-radiograph diffusion models: representation learning, counterfactual explanation,
synthetic data for method development. Not a medical device; not for diagnosis or treatment decisions.
**Every image this model generates or edits is synthetic**: cxrray writes provenance into each one
(DICOM ImageType DERIVED with the model name and version, PNG text chunk) so it cannot pass as an
acquired radiograph. Trained on de-identified data; reports were de-identified before training.

## Architecture

```json
{json.dumps(model_cfg, indent=1, sort_keys=True)}
```
"""
