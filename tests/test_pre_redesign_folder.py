"""A model folder written by vlmkit before the package was split into models/, tiling/, training/ and export/
(commit f111ffd, tests/fixtures/pre_redesign/model: a tiny CLIP + MLP + Llama) loads through today's code, by the
new and the deprecated import paths, and gives the logits that version computed."""
from pathlib import Path

import torch

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "pre_redesign"


def test_old_folder_loads_and_gives_the_same_logits():
    from vlmkit import VLM, load_vlm
    from vlmkit.model import VLM as OldPathVLM  # the deprecated path still names the same class

    assert OldPathVLM is VLM
    expected = torch.load(FIXTURE / "expected.pt", weights_only=True)
    for model in (VLM.from_pretrained(FIXTURE / "model").eval(), load_vlm(FIXTURE / "model").eval()):
        with torch.no_grad():
            logits = model.logits(input_ids=expected["input_ids"], pixel_values=expected["pixel_values"])
        torch.testing.assert_close(logits[:, -3:], expected["logits"], rtol=0, atol=1e-5)
