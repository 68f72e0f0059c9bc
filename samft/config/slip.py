"""SLIP's rules across sections: the SSL loss needs unlabelled images and an encoder that trains; the
text class head and the region-text loss need class names and class-name embeddings."""

from __future__ import annotations

from typing import Any

from samft.config.peft import trains_encoder
from samft.errors import ConfigError


def check_slip(cfg: Any) -> None:
    """The SSL and language options: what each needs, and sources that exclude each other."""
    _check_ssl(cfg)
    cfg.model.text.check("model.text")
    _check_text_users(cfg)


def _check_ssl(cfg: Any) -> None:
    if cfg.loss.ssl.weight > 0 and not cfg.data.unlabelled:
        raise ConfigError(f"loss.ssl.weight: {cfg.loss.ssl.weight} needs unlabelled images in data.unlabelled "
                          f"(folders, globs, CSV lists or 'train')")
    for key, weight in (("loss.ssl.weight", cfg.loss.ssl.weight), ("loss.clip.weight", cfg.loss.clip.weight)):
        if weight > 0 and not trains_encoder(cfg.peft.method):
            raise ConfigError(f"{key}: {weight} trains the image encoder, but peft.method={cfg.peft.method} "
                              f"leaves it frozen: the loss could only train its own projection head")


def _check_text_users(cfg: Any) -> None:
    users = [key for key, on in (("model.class_head=text", cfg.model.class_head == "text"),
                                 (f"loss.clip.weight={cfg.loss.clip.weight}", cfg.loss.clip.weight > 0)) if on]
    for user in users:
        if not cfg.data.classes:
            raise ConfigError(f"{user}: needs class names in data.classes (a multi-class task)")
        if cfg.model.text.source is None:
            raise ConfigError(f"{user}: needs class-name embeddings: model.text.embeddings (a file) or "
                              f"model.text.open_clip_model with model.text.checkpoint")


def unused_option_warnings(cfg: Any) -> list[str]:
    """One line per SLIP option that is set but has no effect (for the loop to warn about)."""
    out = []
    if cfg.data.unlabelled and cfg.loss.ssl.weight == 0:
        out.append(f"data.unlabelled lists {len(cfg.data.unlabelled)} source(s) but loss.ssl.weight is 0: "
                   f"the unlabelled images are not used")
    if cfg.model.text.source and cfg.model.class_head != "text" and cfg.loss.clip.weight == 0:
        out.append("model.text is set but neither model.class_head=text nor loss.clip.weight > 0 uses it")
    return out
