"""Notebook 10's online section: the Hub check, and TRL + PEFT beside our LoRA loop (run offline)."""

from __future__ import annotations

import pytest

from lumorik_sft.course import lora_online, synthetic
from lumorik_sft.models import has_embedded_model


def test_hub_reachable_is_false_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert lora_online.hub_reachable() is False


@pytest.mark.skipif(not has_embedded_model(), reason="the embedded base model is not installed")
def test_trl_beside_ours_trains_the_same_adapter_size_and_both_learn(tmp_path):
    """The notebook's online section, run offline on the embedded model (a local folder)."""
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    records = synthetic.product_descriptions(80, seed=3)
    rows = lora_online.trl_beside_ours(
        "embedded", records[:64], records[64:], tmp_path, r=4, steps=6, batch_size=8, learning_rate=1e-2
    )
    theirs, ours = rows
    assert theirs["trainable"] == ours["trainable"] == 4 * 4 * (256 + 768)  # 4 blocks of c_attn
    assert theirs["val_loss_before"] == ours["val_loss_before"]
    for row in rows:
        assert row["val_loss"] < row["val_loss_before"] - 0.1, row
    assert abs(theirs["val_loss"] - ours["val_loss"]) < 0.5 * (theirs["val_loss_before"] - theirs["val_loss"])
