"""The resume fingerprint: which settings a checkpoint must be resumed with, and the error that names them."""

import dataclasses

import pytest

from cosim_dist.config import Config, ConfigError
from cosim_dist.resume import check_resume, resume_fingerprint

def fingerprint(**train) -> dict:
    cfg = Config()
    return resume_fingerprint(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train)))

def test_the_same_settings_resume_and_free_ones_may_change():
    saved = fingerprint()
    check_resume(saved, fingerprint())
    check_resume(saved, fingerprint(kimg=saved.get('train.kimg', 1) * 2 + 1))   # not part of the fingerprint
    check_resume({**saved, 'data.num_workers': 1}, {**saved, 'data.num_workers': 4})

def test_a_changed_setting_is_named_with_both_values():
    with pytest.raises(ConfigError, match=r"train\.lr_g: 0\.001 in the checkpoint, 0\.002 now.*run\.name="):
        check_resume(fingerprint(lr_g=1e-3), fingerprint(lr_g=2e-3))

def test_a_setting_newer_than_the_checkpoint_matches_only_its_default():
    """A checkpoint written before `train.aux_warmup_kimg` existed resumes with the default (the behaviour of the
    version that wrote it), and is refused with any other value."""
    old = {k: v for k, v in fingerprint().items() if k != 'train.aux_warmup_kimg'}
    check_resume(old, fingerprint())
    unset = r"train\.aux_warmup_kimg: unset \(default 0\.0\) in the checkpoint, 5\.0 now"
    with pytest.raises(ConfigError, match=unset):
        check_resume(old, fingerprint(aux_warmup_kimg=5.0))

def test_a_setting_whose_default_changed_matches_the_old_default():
    """A checkpoint written before `schedule.kind` existed was trained with the rho reading, the default then: it
    resumes with kind=rho and is refused under today's default (sigma), naming both."""
    old = {k: v for k, v in fingerprint().items() if k != 'schedule.kind'}
    check_resume(old, {**fingerprint(), 'schedule.kind': 'rho'})
    with pytest.raises(ConfigError, match=r"schedule\.kind: unset \(default 'rho'\) in the checkpoint, 'sigma' now"):
        check_resume(old, fingerprint())
