"""The auxiliary network D_psi(x_s; sigma_s, sigma_t, c): the teacher architecture plus a second
noise embedding for sigma_t (docs/ALGORITHM.md, "Networks")."""

import torch

T_EMBED_MODES = ('gated', 'sum')

def add_t_embedding(emb: torch.Tensor, emb_t: torch.Tensor, gain: torch.Tensor | None) -> torch.Tensor:
    """emb + emb_t (aux.t_embed=sum) or emb + gain * emb_t (gated), in emb_t's dtype: ZeRO-3 stores a 0-dim gain
    with shape [1], which as a dimensioned fp32 tensor would promote a bf16 embedding to fp32 under autocast."""
    return emb + (emb_t if gain is None else gain.to(emb_t.dtype) * emb_t)

def make_auxiliary(teacher: torch.nn.Module, mode: str = 'gated') -> torch.nn.Module:
    """Build the auxiliary from a teacher: same architecture with `aux_t_embed=mode`, every teacher weight
    copied, and the t-branch initialised from the teacher's own noise embedding.

    The architecture declares `T_EMBED_SOURCES = {t_branch_prefix: teacher_prefix}`. With mode 'gated' the
    t-branch output is multiplied by a learnable gain initialised to 0, so the auxiliary equals the teacher
    exactly at step 0; 'sum' adds the t-embedding without a gate (the literal variant).
    """
    if mode not in T_EMBED_MODES:
        raise ValueError(f'aux.t_embed={mode!r} is invalid; valid choices: {list(T_EMBED_MODES)}')
    aux = type(teacher)(**{**teacher.init_kwargs, 'aux_t_embed': mode})
    state = teacher.state_dict()
    missing, unexpected = aux.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    for dst_prefix, src_prefix in type(teacher).T_EMBED_SOURCES.items():
        for name in [k for k in missing if k.startswith(dst_prefix + '.')]:
            src = src_prefix + name[len(dst_prefix):]
            aux.state_dict()[name].copy_(state[src])
            missing.remove(name)
    left = [k for k in missing if k.rsplit('.', 1)[-1] != 't_gain']
    if left:
        raise RuntimeError(f'auxiliary parameters without an initial value: {left}')
    return aux.to(next(teacher.parameters()).device).train(teacher.training)
