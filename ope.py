# Off-policy evaluation (OPE): what would a saved policy score, estimated from the offline data alone. Docs: docs/ope.md
# IS, WIS, PDIS, WPDIS (Precup, Sutton, Singh 2000), DR (Jiang & Li 2016, https://arxiv.org/abs/1511.03722), WDR
# (Thomas & Brunskill 2016, https://arxiv.org/abs/1604.00923), FQE (Le, Voloshin, Yue 2019,
# https://arxiv.org/abs/1903.08738) and a model-based estimator MB (an ensemble of learned dynamics rolled out under the
# policy); validation metrics as DOPE (Fu et al. 2021, https://arxiv.org/abs/2103.16596).
# Which policy is valued: importance weights need a density, so IS ... WDR value the distribution the policy was trained
# as (`Policy.dist`, "dist"); FQE and MB value its evaluation action (`Policy.act`, "act", what the training scripts
# score) unless --fqe-action sample. Rollouts check the rows that value the policy they run (--rollout-action).
# Read top down: the IS family and its intervals, pi_e, pi_b, FQE, MB, one policy's rows, the command line. Reading
# the checkpoints, the notes and warnings, the table, the verdict, the JSON, the rollouts and the report on several
# policies are in benchmark/ope_report.py.
from __future__ import annotations

import copy
import math
import random
import sys
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from tqdm import tqdm

from common import Policy, mlp
from datasets import Dataset, UserError, action_bounds, check_ranges, dataset_dims, load_dataset, pick_device


class OPEError(UserError):
    """A problem with the inputs that the user can fix; printed as `ope.py: error: ...` without a traceback."""


ESTIMATORS = ("IS", "WIS", "PDIS", "WPDIS", "DR", "WDR", "FQE", "MB")
WEIGHTED = ("IS", "WIS", "PDIS", "WPDIS", "DR", "WDR")  # the rows that need importance weights (a pi_e density)
COVERAGE_WARN = 0.05  # above the data's own 5% of action mass where the data are thin: a warning (docs/ope.md)
MIN_ESS_SHARE = 0.1  # below this share of the episodes a weighted row gets a warning, no interval, no rank metrics
PROGRESS_EVERY = 200  # hot loops advance their progress bar every this many steps: no host sync per step


# ---- Episodes: the IS family, the bootstrap and the initial states need whole episodes, in time order ----------------
@dataclass
class Episodes:
    rows: np.ndarray  # (n, H) int: dataset row of step t of episode i (0 where padded: read it only under `mask`)
    mask: np.ndarray  # (n, H) bool: True for real steps, False after the episode's end

    @property
    def n(self) -> int:
        return self.rows.shape[0]

    @property
    def lengths(self) -> np.ndarray:
        return self.mask.sum(1)

    def pad(self, per_row: np.ndarray) -> np.ndarray:
        """Values per dataset row (N,) -> (n, H), 0 after each episode's end."""
        return np.where(self.mask, np.asarray(per_row, dtype=np.float64)[self.rows], 0.0)


def split_episodes(ds: Dataset, max_cells: int = 50_000_000) -> Episodes:
    """Episodes from terminals/timeouts; checks that rows are in time order (s'_t is the next row's s)."""
    ends = ds.episode_ends()
    starts = np.concatenate([[0], ends[:-1] + 1])
    inner = np.setdiff1d(np.arange(len(ds)), ends)
    same = np.isclose(ds.next_observations[inner], ds.observations[inner + 1], rtol=1e-5, atol=1e-6).all(1)
    if len(inner) and (~same).mean() > 1e-3:
        raise OPEError(f"{ds.name}: the rows are not whole episodes in time order (importance weights multiply along "
                       f"episodes): next_observations[i] != observations[i+1] at {100 * (~same).mean():.1f}% of the "
                       f"rows inside episodes, first at row {int(inner[~same][0])}")
    lengths = ends - starts + 1
    n, horizon = len(lengths), int(lengths.max())
    if n * horizon > max_cells:
        raise OPEError(f"{ds.name}: {n} episodes padded to the longest ({horizon} steps) need {n * horizon:,} cells; "
                       "are terminals/timeouts set? A dataset with no episode ends is one long episode")
    mask = np.arange(horizon)[None, :] < lengths[:, None]
    return Episodes(rows=np.where(mask, starts[:, None] + np.arange(horizon)[None, :], 0), mask=mask)


def resampled_rows(ep: Episodes, counts: np.ndarray) -> np.ndarray:
    """The dataset rows of a bootstrap resample of whole episodes: every step of episode i, counts[i] times."""
    drawn = np.repeat(np.arange(ep.n), np.asarray(counts).astype(np.int64))
    return ep.rows[drawn][ep.mask[drawn]]


# ---- ALGO LOGIC: the estimators as per-episode contributions, and the one routine that resamples them ---------------
# Inputs are (n, H): rewards, log_ratios = log pi_e(a_t|s_t) - log pi_b(a_t|s_t), q_sa = Q̂(s_t, a_t), v_s = V̂(s_t);
# mask marks real steps. Padding: an ended episode is absorbing with r = 0, Q̂ = V̂ = 0 and rho = 1, so its weight is
# carried and it stays in every per-step normaliser (with equal weights WPDIS is then the plain mean return).
# An estimator is terms (num_k, den_k), per-episode arrays (n,) or (n, H), and per-step discounts d (None when the
# terms are one number per episode):  estimate(c) = [ sum_k (c @ num_k) / (c @ den_k) ] @ d  (den None: sum_i c_i),
# c_i = how often episode i is drawn: 1 each for the estimate, (B, n) bootstrap counts for B resamples.
# Weights stay in log space, exponentiated after subtracting a maximum where the estimator self-normalises (the shift
# cancels); plain IS and PDIS need the absolute weights and may overflow to inf (reported).
def log_weights(log_ratios, mask) -> np.ndarray:
    """log w_{0:t} = sum_{t' <= t} log rho_t', (n, H); carried after an episode's end (log rho = 0 there)."""
    return np.cumsum(np.where(np.asarray(mask, dtype=bool), np.asarray(log_ratios, dtype=np.float64), 0.0), axis=1)


def _shifted_exp(log_w: np.ndarray, axis: int = 0) -> np.ndarray:
    """exp(log_w - max along axis): the shift cancels in any self-normalised ratio and avoids overflow."""
    shift = np.max(log_w, axis=axis, keepdims=True)
    return np.exp(log_w - np.where(np.isfinite(shift), shift, 0.0))


def dr_per_episode(rewards, log_ratios, q_sa, v_s, mask, gamma) -> np.ndarray:
    """V_DR^(0) per episode (Jiang & Li 2016): V_DR^(t) = V̂_t + rho_t (r_t + gamma V_DR^(t+1) - Q̂_t), V_DR^(H) = 0."""
    mask = np.asarray(mask, dtype=bool)
    r, q, v = (np.where(mask, np.asarray(x, dtype=np.float64), 0.0) for x in (rewards, q_sa, v_s))
    value = np.zeros(len(r))
    with np.errstate(over="ignore", invalid="ignore"):
        rho = np.exp(np.where(mask, np.asarray(log_ratios, dtype=np.float64), 0.0))
        for t in reversed(range(r.shape[1])):  # padded steps: 0 + 1 * (0 + gamma * 0 - 0) = 0
            value = v[:, t] + rho[:, t] * (r[:, t] + gamma * value - q[:, t])
    return value


def contributions(rewards, log_ratios, mask, gamma, q_sa=None, v_s=None) -> dict[str, tuple]:
    """The terms of IS, WIS, PDIS and WPDIS, and of DR and WDR when Q̂ and V̂ are given (V̂ must be E_{a~pi_e} Q̂)."""
    mask = np.asarray(mask, dtype=bool)
    r, log_w = np.where(mask, np.asarray(rewards, dtype=np.float64), 0.0), log_weights(log_ratios, mask)
    d = gamma ** np.arange(r.shape[1])
    w_end, w = _shifted_exp(log_w[:, -1]), _shifted_exp(log_w, axis=0)  # w_{0:H-1}, w_{0:t}, each up to a factor
    with np.errstate(over="ignore", invalid="ignore"):
        out = {"IS": ([(np.exp(log_w[:, -1]) * (r @ d), None)], None),  # mean_i w_{0:H-1}^i G^i (unbiased)
               "WIS": ([(w_end * (r @ d), w_end)], None),  # sum_i w^i G^i / sum_i w^i (biased, consistent)
               "PDIS": ([((np.exp(log_w) * r) @ d, None)], None),  # mean_i sum_t gamma^t w_{0:t}^i r_t^i
               "WPDIS": ([(w * r, w)], d)}  # sum_t gamma^t (sum_i w_{0:t}^i r_t^i) / (sum_i w_{0:t}^i)
    if q_sa is not None:
        q, v = (np.where(mask, np.asarray(x, dtype=np.float64), 0.0) for x in (q_sa, v_s))
        w_prev = np.concatenate([np.ones((len(r), 1)), w[:, :-1]], axis=1)  # ŵ_{t-1}, ŵ_{-1} = 1/n once normalised
        # DR: mean_i V_DR^(0); WDR (Thomas & Brunskill 2016): DR unrolled with w_{0:t}^i / n replaced by the per-step
        # normalised ŵ_t^i = w_{0:t}^i / sum_j w_{0:t}^j:  sum_t gamma^t sum_i [ŵ_t^i (r_t - Q̂_t) + ŵ_{t-1}^i V̂_t]
        out["DR"] = ([(dr_per_episode(rewards, log_ratios, q_sa, v_s, mask, gamma), None)], None)
        out["WDR"] = ([(w * (r - q), w), (w_prev * v, w_prev)], d)
    return out


def resample(terms: tuple, counts: np.ndarray | None = None):
    """The estimate from an estimator's terms (see above); with (B, n) bootstrap counts, the B resampled estimates."""
    parts, d = terms
    c = np.ones(len(parts[0][0])) if counts is None else np.asarray(counts, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        per_part = [(c @ num) / (c.sum(-1) if den is None else c @ den) for num, den in parts]
        total = sum(per_part[1:], per_part[0])
        return total if d is None else total @ d


def mean_terms(per_episode: np.ndarray) -> tuple:
    """The terms of a plain mean over episodes (FQE's and MB's values of the initial states, rollout returns)."""
    return [(per_episode, None)], None


def estimate(name, rewards, log_ratios, mask, gamma, q_sa=None, v_s=None, counts=None):
    """One estimator on (n, H) arrays, e.g. estimate("WPDIS", rewards, log_ratios, mask, 0.99)."""
    return resample(contributions(rewards, log_ratios, mask, gamma, q_sa, v_s)[name], counts)


def effective_sample_size(log_w: np.ndarray) -> float:
    """Kish's ESS (sum w)^2 / sum w^2 of one weight per episode: n for equal weights, 1 when one episode dominates."""
    w = _shifted_exp(np.asarray(log_w, dtype=np.float64))
    return float(w.sum() ** 2 / (w**2).sum()) if w.sum() > 0 else 0.0


def per_decision_ess(log_ratios, mask, gamma) -> float:
    """The ESS of the step-t weights w_{0:t}, averaged over t with weights gamma^t (early steps count more)."""
    w = _shifted_exp(log_weights(log_ratios, mask), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ess = np.nan_to_num(w.sum(0) ** 2 / (w**2).sum(0))
    d = gamma ** np.arange(w.shape[1])
    return float(ess @ d / d.sum())


def bootstrap_counts(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray | None:
    """(n_boot, n): how often each whole episode is drawn in each resample; None if n < 2 or n_boot == 0."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64) if n >= 2 and n_boot > 0 else None


def percentile_ci(samples: np.ndarray) -> list[float] | None:
    """The 2.5% and 97.5% percentiles of the finite bootstrap values (None if fewer than 90% are finite)."""
    samples = np.asarray(samples, dtype=np.float64)
    finite = samples[np.isfinite(samples)]
    if len(finite) < max(2, 0.9 * len(samples)):
        return None
    return [float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))]


def tail_mc_error(samples: np.ndarray, batches: int = 10) -> float:
    """Monte-Carlo error of the interval's endpoints: their std over disjoint batches of resamples / sqrt(batches)."""
    parts = [percentile_ci(b) for b in np.array_split(np.asarray(samples, dtype=np.float64), batches)]
    if any(p is None for p in parts):
        return float("nan")
    return float(np.std(np.array(parts), axis=0, ddof=1).max() / math.sqrt(batches))


# ---- pi_e as the estimators see it; truncated Gaussians keep every Box density inside the action box --------------
def log_box_mass(loc, scale, low, high) -> torch.Tensor:
    """log P(low <= X <= high) per dimension for X ~ N(loc, scale)."""
    mass = torch.special.ndtr((high - loc) / scale) - torch.special.ndtr((low - loc) / scale)
    return torch.log(mass.clamp_min(1e-30))


def truncated_normal_log_prob(x, loc, scale, low, high) -> torch.Tensor:
    """log N(x; loc, scale) / P(box), summed over action dimensions: a density that integrates to 1 on the box."""
    return (torch.distributions.Normal(loc, scale).log_prob(x) - log_box_mass(loc, scale, low, high)).sum(-1)


def truncated_normal_sample(loc, scale, low, high) -> torch.Tensor:
    """Exact draws from N(loc, scale) truncated to [low, high], by the inverse CDF (float64 for the tails)."""
    loc64, scale64 = loc.double(), scale.double()
    lo = torch.special.ndtr((low.double() - loc64) / scale64)
    hi = torch.special.ndtr((high.double() - loc64) / scale64)
    u = (lo + (hi - lo) * torch.rand_like(lo)).clamp(1e-12, 1 - 1e-12)
    x = loc64 + scale64 * torch.special.ndtri(u)
    return torch.maximum(torch.minimum(x, high.double()), low.double()).to(loc.dtype)


class Target:
    """pi_e: `act`, the evaluation action; `density` (None if none), which `log_prob`, `probs` and `sample` use. A Box
    Gaussian is truncated to the action box (a clipped sample is a point mass on the edge no pi_b density covers)."""

    def __init__(self, policy: Policy, n_actions: int | None, low: torch.Tensor | None, high: torch.Tensor | None,
                 smoothing: float | None, probe_obs: torch.Tensor | None = None):
        self.policy, self.discrete, self.n_actions, self.low, self.high = policy, policy.discrete, n_actions, low, high
        self.smoothing, self.notes, self.density = None, [], None
        if policy.dist is not None:
            if smoothing is not None:
                self.notes.append("--smoothing-width ignored: the policy has its own distribution")
            if self.discrete:
                self.density = "categorical pi(.|s)"
            elif probe_obs is None:
                self.density = "pi(.|s) (a Gaussian one truncated to the action box)"
            else:
                gaussian = self.gaussian(probe_obs) is not None
                self.density = ("Gaussian pi(.|s) truncated to the action box" if gaussian else
                                f"pi(.|s) ({type(policy.dist(probe_obs)).__name__}; support taken to be the box)")
        elif smoothing is not None:
            self.smoothing = smoothing
            self.density = (f"epsilon-greedy around the policy's action (eps {smoothing})" if self.discrete else
                            f"N(policy's action, {smoothing}^2) truncated to the action box (--smoothing-width)")
        self.skip_reason = None if self.density else (
            "no density (Policy.dist is None: a deterministic or greedy policy): importance weights pi_e(a|s) / "
            "pi_b(a|s) are undefined, so IS ... WDR are skipped; --smoothing-width W values a smoothed version instead")

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        return self.policy.act(obs)

    def gaussian(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(loc, scale) of a Box pi_e(.|s) that is Gaussian before truncation; None for any other distribution."""
        if self.smoothing is not None:
            loc = self.act(obs).float()
            return loc, torch.full_like(loc, self.smoothing)
        d = self.policy.dist(obs)
        base = d.base_dist if isinstance(d, torch.distributions.Independent) else d
        return torch.broadcast_tensors(base.loc, base.scale) if isinstance(base, torch.distributions.Normal) else None

    def probs(self, obs: torch.Tensor) -> torch.Tensor:
        """Discrete: pi_e(.|s) as (B, n_actions); a point mass on `act` when there is no density."""
        if self.policy.dist is not None:
            d = self.policy.dist(obs)
            if isinstance(d, torch.distributions.Categorical):
                return d.probs
            every = torch.arange(self.n_actions, device=obs.device)
            return torch.stack([d.log_prob(a.expand(len(obs))) for a in every], -1).exp()
        eps = self.smoothing or 0.0
        return (1.0 - eps) * F.one_hot(self.act(obs).long(), self.n_actions).float() + eps / self.n_actions

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        if self.discrete:
            return torch.log(self.probs(obs).gather(1, actions.long()[:, None]).squeeze(1))
        g = self.gaussian(obs)
        if g is not None:
            return truncated_normal_log_prob(actions, *g, self.low, self.high)
        margin = 1e-6 * (self.high - self.low)  # other densities (CQL's tanh-Gaussian): off the edge, atanh is finite
        return self.policy.dist(obs).log_prob(torch.maximum(torch.minimum(actions, self.high - margin),
                                                            self.low + margin))

    def sample(self, obs: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """a ~ pi_e(.|s): (B,) or (B, d); with k, k draws per state: (B, k) or (B, k, d). `act` if no density."""
        shape = () if k is None else (k,)
        if self.discrete:
            a = torch.distributions.Categorical(probs=self.probs(obs)).sample(shape)
            return a if k is None else a.T
        if self.density is None:
            a = self.act(obs)
            return a if k is None else a[:, None].expand(-1, k, -1)
        g = self.gaussian(obs)
        if g is not None:
            loc, scale = g if k is None else (x[:, None].expand(-1, k, -1) for x in g)
            return truncated_normal_sample(loc, scale, self.low, self.high)
        a = torch.maximum(torch.minimum(self.policy.dist(obs).sample(shape), self.high), self.low)
        return a if k is None else a.transpose(0, 1)


@torch.no_grad()
def batched(fn, *tensors: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """fn applied to row chunks of the tensors, concatenated (keeps memory flat on 100k-row datasets)."""
    return torch.cat([fn(*(t[i: i + chunk] for t in tensors)) for i in range(0, len(tensors[0]), chunk)])


def policy_at(target: Target, obs: torch.Tensor, mode: str, k: int) -> torch.Tensor:
    """pi_e as FQE reads it: Discrete, probabilities (B, n); Box, actions (B, k, d) to average over (`act`: k = 1)."""
    if target.discrete:
        return F.one_hot(target.act(obs).long(), target.n_actions).float() if mode == "act" else target.probs(obs)
    return target.act(obs)[:, None] if mode == "act" else target.sample(obs, k)


def normalized_obs(obs: torch.Tensor, stats: dict) -> torch.Tensor:
    return (obs - stats["obs_mean"]) / stats["obs_std"]


def unit_actions(actions: torch.Tensor, stats: dict) -> torch.Tensor:
    """Box actions rescaled from [low, high] to [-1, 1]."""
    return (actions - (stats["high"] + stats["low"]) / 2) / ((stats["high"] - stats["low"]) / 2)


def progress_bar(total: int, desc: str, unit: str = "step") -> tqdm:
    """A bar on stderr, gone when the phase ends; redrawn every 0.5 s on a terminal, 10 s into a file (TQDM_DISABLE)."""
    return tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 10.0)


def gradient_steps(params, loss_fn, steps: int, lr: float, bar, after_step=None) -> None:
    """`steps` AdamW updates (weight decay 1e-5) of loss_fn(), each then after_step(step): every network here."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-5)
    for step in range(1, steps + 1):
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step(step)
        if step % PROGRESS_EVERY == 0:
            bar.update(PROGRESS_EVERY)
    bar.update(steps % PROGRESS_EVERY)


# ---- Behaviour policy: logged exact log-probabilities, or behaviour cloning (maximum likelihood) -------------------
class BehaviorModel(nn.Module):
    """pi_b fitted to the data: categorical (Discrete), or a state-dependent Gaussian truncated to the action box."""

    def __init__(self, obs_dim: int, act_dim: int, n_actions: int | None, stats: dict, args: Args):
        super().__init__()
        self.discrete, self.stats = n_actions is not None, stats
        self.net = mlp(obs_dim, n_actions if self.discrete else 2 * act_dim, [args.hidden_dim] * args.n_layers)

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        s, out = self.stats, self.net(normalized_obs(obs, self.stats))
        if self.discrete:
            return F.log_softmax(out, -1).gather(1, actions.long()[:, None]).squeeze(1)
        mu, log_std = out.chunk(2, -1)
        center, half = (s["high"] + s["low"]) / 2, (s["high"] - s["low"]) / 2
        loc, scale = center + half * torch.tanh(mu), half * log_std.clamp(-5.0, 2.0).exp()
        return truncated_normal_log_prob(actions, loc, scale, s["low"], s["high"])


def train_behavior_model(data: dict, rows: torch.Tensor, stats: dict, dims: tuple, args: Args, bar) -> BehaviorModel:
    """Maximum-likelihood behaviour cloning on the given dataset rows for --bc-steps."""
    model = BehaviorModel(*dims, stats, args).to(rows.device)

    def nll():
        idx = rows[torch.randint(0, len(rows), (args.batch_size,), device=rows.device)]
        return -model.log_prob(data["obs"][idx], data["actions"][idx]).mean()

    gradient_steps(model.parameters(), nll, args.bc_steps, args.learning_rate, bar)
    return model


def fit_behavior(data: dict, ep: Episodes, stats: dict, dims: tuple, args: Args, rng: np.random.Generator):
    """Each of --bc-folds folds of episodes gets log pi_b(a|s) from a model fitted on the others: (per row, mean, k)."""
    n_rows, k = len(data["rewards"]), max(1, min(args.bc_folds, ep.n))  # k = 1: fit and score on everything
    fold = np.empty(n_rows, dtype=np.int64)
    fold[ep.rows[ep.mask]] = np.repeat(rng.permutation(ep.n) % k, ep.lengths)
    log_probs = torch.empty(n_rows, device=data["rewards"].device)
    with progress_bar(k * args.bc_steps, f"behaviour cloning (fold 1/{k})") as bar:
        for f in range(k):
            bar.set_description(f"behaviour cloning (fold {f + 1}/{k})", refresh=False)
            train = torch.as_tensor(np.flatnonzero(fold != f) if k > 1 else np.arange(n_rows), device=log_probs.device)
            score = torch.as_tensor(np.flatnonzero(fold == f), device=log_probs.device)
            model = train_behavior_model(data, train, stats, dims, args, bar)
            log_probs[score] = batched(model.log_prob, data["obs"][score], data["actions"][score])
    lp = log_probs.double().cpu().numpy()
    return lp, float(lp.mean()), k


@torch.no_grad()
def low_coverage_share(model: BehaviorModel, target: Target, data: dict, mode: str, k: int, q: float = 0.05) -> float:
    """pi_e's (`mode`) action mass on the data's states where the fitted pi_b is below its q-quantile on the data's own
    actions: where FQE and MB extrapolate (about q for a policy that acts like the data)."""
    obs = data["obs"]
    threshold = torch.quantile(batched(model.log_prob, obs, data["actions"]).float(), q)
    pi = batched(lambda o: policy_at(target, o, mode, k), obs)
    if target.discrete:  # pi: (N, n) probabilities; the fitted log pi_b of every action, (N, n)
        every = torch.arange(target.n_actions, device=obs.device)
        log_pb = torch.stack([batched(model.log_prob, obs, a.expand(len(obs))) for a in every], -1)
        return float((pi * (log_pb < threshold)).sum(1).mean())
    n, kk, d = pi.shape  # Box: pi holds k actions per state
    log_pb = batched(model.log_prob, obs.repeat_interleave(kk, 0), pi.reshape(n * kk, d))
    return float((log_pb < threshold).float().mean())


def check_behavior_log_probs(log_probs: np.ndarray, name: str) -> None:
    """A logged action with pi_b(a|s) = 0 (or a NaN) cannot come from the behaviour policy: the dataset is malformed."""
    rows = np.flatnonzero(np.isneginf(log_probs) | np.isnan(log_probs))
    if len(rows):
        raise OPEError(f"{name}: {len(rows)} logged action(s) have behaviour probability 0 (log pi_b(a|s) = -inf or "
                       f"NaN), first at row(s) {rows[:5].tolist()}: fix behavior_log_probs, or pass --behavior fitted")


# ---- ALGO LOGIC: Fitted Q Evaluation (Le, Voloshin, Yue 2019; DOPE's deep FQE) ---------------------------------------
# Regress Q(s, a) on r + gamma (1 - terminal) E_{a'~pi_e} Q̄(s', a'): dataset (s, a) on the left, pi_e's actions at s'
# on the right, Q̄ a Polyak target network; the estimate is the mean over initial states of E_{a~pi_e} Q̄(s0, a).
class QModel(nn.Module):
    """Q(s, a): an MLP on s ⊕ a (Box) or s -> Q(s, .) (Discrete), outputting Q / scale, scale ~ r / (1 - gamma)."""

    def __init__(self, obs_dim: int, act_dim: int, n_actions: int | None, stats: dict, scale: float,
                 hidden: int = 256, layers: int = 2):
        super().__init__()
        self.discrete, self.stats, self.scale = n_actions is not None, stats, scale
        in_dim, out_dim = (obs_dim, n_actions) if self.discrete else (obs_dim + act_dim, 1)
        self.net = mlp(in_dim, out_dim, [hidden] * layers)

    def all_actions(self, obs: torch.Tensor) -> torch.Tensor:
        """Discrete: Q(s, .) as (B, n_actions)."""
        return self.net(normalized_obs(obs, self.stats)) * self.scale

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Q(s, a): actions (B,) / (B, d) give (B,); Box actions (B, k, d) give (B, k)."""
        if self.discrete:
            return self.all_actions(obs).gather(1, actions.long()[:, None]).squeeze(1)
        a, o = unit_actions(actions, self.stats), normalized_obs(obs, self.stats)
        if a.dim() == 3:
            o = o[:, None].expand(-1, a.shape[1], -1)
        return self.net(torch.cat([o, a], -1)).squeeze(-1) * self.scale

    def expected(self, obs: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
        """E_{a~pi} Q(s, a) for pi as `policy_at` gives it (probabilities, or actions to average over)."""
        return (pi * self.all_actions(obs)).sum(-1) if self.discrete else self(obs, pi).mean(-1)


def fit_fqe(q: QModel, data: dict, next_pi: torch.Tensor, gamma: float, steps: int, tau: float, lr: float,
            batch_size: int, probe: tuple[torch.Tensor, torch.Tensor] | None = None,
            desc: str = "FQE") -> tuple[QModel, list]:
    """FQE: the target network Q̄ and the mean of E_pi Q̄ over the probe states at 5 points of training (moving: more
    --fqe-steps). next_pi: pi_e at every row's s' (`policy_at`; Box: k actions, one drawn per update)."""
    target = copy.deepcopy(q)
    r = data["rewards"]
    lo = min(float(r.min()), 0.0) / (1 - gamma) if gamma < 1 else -math.inf  # values lie in [r_min, r_max] / (1-g),
    hi = max(float(r.max()), 0.0) / (1 - gamma) if gamma < 1 else math.inf  # widened to 0 (terminal states are 0)
    trace, probe_at = [], {int(steps * f) for f in (0.2, 0.4, 0.6, 0.8, 1.0)}

    def td_loss():
        idx = torch.randint(0, len(r), (batch_size,), device=r.device)
        with torch.no_grad():
            s_next, pi = data["next_obs"][idx], next_pi[idx]
            if not q.discrete:  # one of the k stored pi_e actions at s': an unbiased one-sample expectation
                pick = torch.randint(0, pi.shape[1], (batch_size,), device=r.device)
                pi = pi[torch.arange(batch_size, device=r.device), pick][:, None]
            y = (r[idx] + gamma * (1.0 - data["terminals"][idx]) * target.expected(s_next, pi)).clamp(lo, hi)
        return F.mse_loss(q(data["obs"][idx], data["actions"][idx]) / q.scale, y / q.scale)

    @torch.no_grad()
    def polyak(step):
        for p, tp in zip(q.parameters(), target.parameters()):  # Q̄ <- (1 - tau) Q̄ + tau Q
            tp.lerp_(p, tau)
        if probe is not None and step in probe_at:
            trace.append(float(batched(target.expected, *probe).mean()))

    with progress_bar(steps, desc) as bar:
        gradient_steps(q.parameters(), td_loss, steps, lr, bar, polyak)
    return target, trace


# ---- ALGO LOGIC: model-based OPE (DOPE's model_based.py) ------------------------------------------------------------
# An ensemble of MLPs (s, a) -> (s' - s, r, termination logit), rolled out under pi_e from the dataset's initial
# states; predicted states and rewards are clipped to the data's range.
class EnsembleLinear(nn.Module):
    """E independent linear layers applied in one batched matmul: x (E, B, in) -> (E, B, out)."""

    def __init__(self, n_models: int, in_dim: int, out_dim: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)  # nn.Linear's default range
        self.weight = nn.Parameter(torch.empty(n_models, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n_models, 1, out_dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class DynamicsEnsemble(nn.Module):
    """Each member predicts the normalised (s' - s, r) and a termination logit from (normalised s, encoded a)."""

    def __init__(self, n_models: int, obs_dim: int, act_dim: int, n_actions: int | None, stats: dict, args: Args):
        super().__init__()
        self.stats, self.n_actions, self.obs_dim = stats, n_actions, obs_dim
        in_dim, layers = obs_dim + (n_actions or act_dim), []
        for _ in range(args.n_layers):
            layers += [EnsembleLinear(n_models, in_dim, args.hidden_dim), nn.ReLU()]
            in_dim = args.hidden_dim
        self.net = nn.Sequential(*layers, EnsembleLinear(n_models, in_dim, obs_dim + 2))

    def raw(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """(E, B, obs_dim + 2): normalised delta, normalised reward, termination logit."""
        a = (F.one_hot(actions.long(), self.n_actions).float() if self.n_actions is not None
             else unit_actions(actions, self.stats))
        return self.net(torch.cat([normalized_obs(obs, self.stats), a], -1))

    def loss(self, obs, actions, rewards, next_obs, terminals) -> torch.Tensor:
        """Inputs (E, B, ...), one minibatch per member. MSE on normalised s' - s and r, BCE on the terminal flag."""
        s, out = self.stats, self.raw(obs, actions)
        delta = (next_obs - obs - s["delta_mean"]) / s["delta_std"]
        return (F.mse_loss(out[..., : self.obs_dim], delta) + F.mse_loss(out[..., self.obs_dim],
                                                                          (rewards - s["r_mean"]) / s["r_std"])
                + F.binary_cross_entropy_with_logits(out[..., -1], terminals))

    @torch.no_grad()
    def step(self, obs: torch.Tensor, actions: torch.Tensor):
        """(next state, reward, termination probability); state and reward clipped to the data's range."""
        s, out = self.stats, self.raw(obs, actions)
        next_obs = obs + out[..., : self.obs_dim] * s["delta_std"] + s["delta_mean"]
        reward = out[..., self.obs_dim] * s["r_std"] + s["r_mean"]
        next_obs = torch.maximum(torch.minimum(next_obs, s["obs_max"]), s["obs_min"])
        return next_obs, reward.clamp(s["r_min"], s["r_max"]), torch.sigmoid(out[..., -1])


def fit_model(model: DynamicsEnsemble, data: dict, n_models: int, steps: int, lr: float, batch_size: int,
              desc: str = "dynamics models") -> None:
    """Train every member on its own uniform minibatches (different data order and initialisation)."""
    def loss_fn():
        idx = torch.randint(0, len(data["rewards"]), (n_models, batch_size), device=data["rewards"].device)
        return model.loss(*(data[k][idx] for k in ("obs", "actions", "rewards", "next_obs", "terminals")))

    with progress_bar(steps, desc) as bar:
        gradient_steps(model.parameters(), loss_fn, steps, lr, bar)


@torch.no_grad()
def model_rollout(model: DynamicsEnsemble, act_fn, s0: torch.Tensor, n_models: int, horizon: int,
                  gamma: float, desc: str = "model rollouts") -> tuple[np.ndarray, np.ndarray]:
    """Each member rolls each initial state out under act_fn, ending with its predicted probability: (disc, undisc)."""
    state = s0[None].expand(n_models, -1, -1).clone()
    alive = torch.ones(state.shape[:2], device=s0.device)
    disc, undisc = torch.zeros_like(alive), torch.zeros_like(alive)
    with progress_bar(horizon, desc) as bar:  # (the loop already syncs once a step, on alive.any())
        for t in range(horizon):
            actions = act_fn(state.reshape(-1, state.shape[-1]))
            state, reward, p_end = model.step(state, actions.reshape(*state.shape[:2], *actions.shape[1:]))
            disc += alive * gamma**t * reward
            undisc += alive * reward
            alive = alive * (torch.rand_like(p_end) >= p_end).float()
            bar.update()
            if not alive.any():
                break
    return disc.double().cpu().numpy(), undisc.double().cpu().numpy()


# ---- One policy: the model-based estimators (FQE, MB), the weighted ones (IS ... WDR), their rows -----------------
@dataclass
class Row:
    """An estimator before resampling: the policy it values, its terms, ESS (weighted rows), FQE refit estimates."""
    values: str
    disc: tuple
    undisc: tuple | None = None
    ess: float | None = None
    refits: np.ndarray | None = None


def fqe_refits(ep: Episodes, new_q, data: dict, next_pi: torch.Tensor, s0: torch.Tensor, pi0: torch.Tensor,
               args: Args, label: str) -> np.ndarray | None:
    """--refit-bootstrap K: FQE refitted on K resamples of whole episodes, on its own streams (nothing else moves)."""
    counts = bootstrap_counts(ep.n, args.refit_bootstrap, np.random.default_rng([args.seed, 1]))
    if counts is None:
        return None
    out, device = np.empty(len(counts)), s0.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(args.seed + 1)
        for k, c in enumerate(counts):
            rows = torch.as_tensor(resampled_rows(ep, c), device=device)
            q, _ = fit_fqe(new_q(), {key: v[rows] for key, v in data.items()}, next_pi[rows], args.discount,
                           args.fqe_steps, args.fqe_tau, args.learning_rate, args.batch_size,
                           desc=f"FQE refit {k + 1}/{len(counts)} {label}".rstrip())
            out[k] = resample(mean_terms(batched(q.expected, s0, pi0).double().cpu().numpy()), c)
    return out


def model_estimates(ds: Dataset, ep: Episodes, target: Target, data: dict, stats: dict, args: Args, res: dict,
                    model: DynamicsEnsemble | None, coverage_model: BehaviorModel | None, label: str):
    """FQE, the coverage check and MB, which need only actions from pi_e: ({name: Row or why skipped}, FQE's Q̂)."""
    gamma, device, diag, q = args.discount, data["rewards"].device, res["diagnostics"], None
    s0 = data["obs"][torch.as_tensor(ep.rows[:, 0], device=device)]
    values = "dist" if args.fqe_action == "sample" and target.density is not None else "act"  # no density: acts
    rows = {"FQE": "--fqe-steps 0", "MB": "--mb-steps 0"}
    if args.fqe_steps > 0:
        scale = max(float(data["rewards"].std()), float(data["rewards"].abs().mean()), 1e-6) / max(1 - gamma, 1e-3)

        def new_q() -> QModel:
            return QModel(*dataset_dims(ds), stats, scale, args.hidden_dim, args.n_layers).to(device)

        q = new_q()
        next_pi, pi0 = (batched(lambda o: policy_at(target, o, args.fqe_action, args.v_samples), x)
                        for x in (data["next_obs"], s0))
        fqe_data = {**data, "terminals": data["ends"]} if args.fqe_time_limit_terminal else data
        q, trace = fit_fqe(q, fqe_data, next_pi, gamma, args.fqe_steps, args.fqe_tau, args.learning_rate,
                           args.batch_size, probe=(s0, pi0), desc=f"FQE {label}".rstrip())
        rows["FQE"] = Row(values, mean_terms(batched(q.expected, s0, pi0).double().cpu().numpy()))
        diag["fqe_trace"], diag["fqe_interval"] = trace, "start states only"
        if args.refit_bootstrap > 0:
            rows["FQE"].refits = fqe_refits(ep, new_q, fqe_data, next_pi, s0, pi0, args, label)
            if rows["FQE"].refits is not None:
                diag["fqe_interval"], diag["fqe_refit_estimates"] = "refit", rows["FQE"].refits.tolist()
    diag["low_coverage_share"] = None  # the share of the valued policy's actions where the data are thin
    if coverage_model is not None:
        diag["low_coverage_share"] = low_coverage_share(coverage_model, target, data, args.fqe_action, args.v_samples)
    if model is not None:  # roll the (policy-independent) ensemble out under this policy
        horizon = args.mb_horizon or int(ep.lengths.max())
        disc, undisc = model_rollout(model, target.act if args.fqe_action == "act" else target.sample, s0,
                                     args.mb_ensemble, horizon, gamma, desc=f"model rollouts {label}".rstrip())
        rows["MB"] = Row(values, mean_terms(disc.mean(0)), mean_terms(undisc.mean(0)))
        diag["mb_member_estimates"], diag["mb_horizon"] = disc.mean(1).tolist(), horizon
    return rows, q


def weighted_estimates(ds: Dataset, ep: Episodes, target: Target, data: dict, stats: dict, log_pb: np.ndarray,
                       args: Args, res: dict, q: QModel | None) -> dict:
    """IS, WIS, PDIS, WPDIS, DR and WDR (with FQE's Q̂), the divergence diagnostics and the HCOPE lower bound."""
    from benchmark import ope_report as report  # the lower bound

    if target.density is None:  # (the note says why)
        return {name: "the policy has no density (see the note below)" for name in WEIGHTED}
    gamma, diag = args.discount, res["diagnostics"]
    log_pe = batched(target.log_prob, data["obs"], data["actions"]).double().cpu().numpy()
    if np.isnan(log_pe).any():
        raise OPEError(f"pi_e's log_prob is NaN for {int(np.isnan(log_pe).sum())} dataset actions (first at row "
                       f"{int(np.flatnonzero(np.isnan(log_pe))[0])}): the policy's distribution is broken there")
    with np.errstate(invalid="ignore"):
        lr_rows = lr_used = log_pe - log_pb
    if args.clip_log_ratio is not None:  # DOPE: per-step log-ratios clipped to [-6, 2]; trades variance for bias
        lo, hi = args.clip_log_ratio
        diag["clipped_share"] = float(((lr_rows < lo) | (lr_rows > hi)).mean())
        lr_used = np.clip(lr_rows, lo, hi)
    rewards, log_ratios, mask = ep.pad(ds.rewards), ep.pad(lr_used), ep.mask
    log_w = log_weights(log_ratios, mask)[:, -1]

    # How far pi_e is from pi_b on the data: log-ratio and KL(pi_b || pi_e) (Monte-Carlo over the dataset's (s, a),
    # draws from pi_b), weight concentration and effective sample sizes
    zero, ess, w = float(np.isneginf(lr_rows).mean()), effective_sample_size(log_w), _shifted_exp(log_w)
    mean_lr = float(lr_rows.mean()) if zero == 0 else float("-inf")
    diag.update(mean_log_ratio=mean_lr, kl_behavior_target=-mean_lr, zero_prob_share=zero,
                max_log10_weight=float(log_w.max() / math.log(10)),
                median_log10_weight=float(np.median(log_w) / math.log(10)),
                share_weights_above_threshold=float((log_w > math.log(args.weight_threshold)).mean()),
                top_episode_weight_share=float(w.max() / w.sum()) if w.sum() > 0 else float("nan"),
                ess=ess, ess_share=ess / ep.n, per_decision_ess=per_decision_ess(log_ratios, mask, gamma),
                n_episodes=ep.n)
    if not target.discrete and target.gaussian(data["obs"][:1]) is not None:  # how much truncation changes pi_e
        mass = batched(lambda o: log_box_mass(*target.gaussian(o), target.low, target.high).sum(-1).exp(), data["obs"])
        diag["pi_e_mass_inside_box"] = float(mass.mean())

    # a 95% lower bound from IS (Thomas et al. 2015): on the unclipped ratios (it rests on E[w] = 1), exact only with
    # the logged pi_b (main's rule for them)
    exact = args.behavior != "fitted" and ds.behavior_log_probs is not None
    diag["hcope"] = report.lower_bound(rewards, ep.pad(lr_rows), mask, gamma, stats, args.seed, exact)

    # DR and WDR: FQE's Q̂ and V̂(s) = E_{a~pi_e(.|s)} Q̂(s, a) under the *same* distribution as the ratios (only then
    # is DR unbiased for any Q̂)
    q_sa = v_s = None
    if q is not None:
        q_sa = ep.pad(batched(q, data["obs"], data["actions"]).double().cpu().numpy())
        v_s = ep.pad(batched(lambda o: q.expected(o, policy_at(target, o, "sample", args.v_samples)),
                             data["obs"]).double().cpu().numpy())
    terms_d, terms_u = (contributions(rewards, log_ratios, mask, g, q_sa, v_s) for g in (gamma, 1.0))
    ess = {name: diag["ess" if name in ("IS", "WIS") else "per_decision_ess"] for name in terms_d}
    rows = {name: Row("dist", terms_d[name], terms_u[name], ess[name]) for name in terms_d}
    rows.update({name: "needs FQE's Q (--fqe-steps 0)" for name in WEIGHTED if name not in rows})
    return rows


def table_row(ds: Dataset, row: Row, counts: np.ndarray | None, n: int, notes: list, name: str) -> dict:
    """One estimator's results and 95% CIs. A weighted row whose ESS is below MIN_ESS_SHARE of the n episodes gets no
    interval (resampling a few dominant episodes gives tight, meaningless ones), and is unreliable: out of the ranks."""
    d, u = float(resample(row.disc)), float(resample(row.undisc)) if row.undisc is not None else float("nan")
    low_ess = row.ess is not None and row.ess < MIN_ESS_SHARE * n
    boot = None if low_ess else counts
    boot_d = row.refits if row.refits is not None else resample(row.disc, boot) if boot is not None else None
    ci_d = percentile_ci(boot_d) if boot_d is not None else None
    ci_u = percentile_ci(resample(row.undisc, boot)) if boot is not None and row.undisc is not None else None
    if boot_d is not None and not np.isfinite(boot_d).all():  # percentile_ci keeps the finite ones only
        notes.append(f"{name}: {int((~np.isfinite(boot_d)).sum())} of {len(boot_d)} bootstrap resamples were not "
                     "finite and were left out of its interval" + ("" if ci_d else " (too many: no interval)"))
    return dict(values=row.values, discounted=d, undiscounted=u, normalized=float(ds.normalized_score(u)),
                ci_discounted=ci_d, ci_undiscounted=ci_u,
                ci_normalized=[float(ds.normalized_score(x)) for x in ci_u] if ci_u else None,
                ess=row.ess, skipped=None, ci_mc_error=tail_mc_error(boot_d) if ci_d else None,
                unreliable=f"ESS {row.ess:.1f} < {100 * MIN_ESS_SHARE:.0f}% of {n} episodes" if low_ess else None)


def evaluate_policy(ds: Dataset, ep: Episodes, target: Target, data: dict, stats: dict, log_pb: np.ndarray,
                    args: Args, model: DynamicsEnsemble | None = None, rng: np.random.Generator | None = None,
                    label: str = "", coverage_model: BehaviorModel | None = None) -> dict:
    """Every estimator for one policy ({name: table_row, or why skipped}), diagnostics, notes and warnings."""
    from benchmark import ope_report as report  # the notes and warnings the rows and diagnostics call for

    counts = bootstrap_counts(ep.n, args.bootstrap, rng or np.random.default_rng(args.seed))
    res = dict(estimates={}, diagnostics={}, notes=list(target.notes), warnings=[])
    rows, q = model_estimates(ds, ep, target, data, stats, args, res, model, coverage_model, label)
    rows.update(weighted_estimates(ds, ep, target, data, stats, log_pb, args, res, q))
    report.add_notes(res, args, ds, ep, target)
    skipped = dict.fromkeys(("values", "discounted", "undiscounted", "normalized", "ci_discounted", "ci_undiscounted",
                             "ci_normalized", "ess", "skipped", "unreliable", "ci_mc_error"))
    est = {name: table_row(ds, row, counts, ep.n, res["notes"], name) if isinstance(row, Row) else
           dict(skipped, skipped=row) for name, row in rows.items()}
    return {**res, "estimates": {name: est[name] for name in ESTIMATORS}}


# ---- TRY NOT TO MODIFY: the data on the device, the flags, the run ---------------------------------------------------
def device_data(ds: Dataset, device: torch.device) -> tuple[dict, dict]:
    """The dataset as tensors on the device, and the statistics every fitted network normalises with."""
    def t(x, dtype=torch.float32):
        return torch.as_tensor(np.asarray(x), dtype=dtype, device=device)

    data = dict(obs=t(ds.observations), actions=t(ds.actions, torch.long if ds.discrete else torch.float32),
                rewards=t(ds.rewards), next_obs=t(ds.next_observations), terminals=t(ds.terminals),
                ends=t(ds.terminals | ds.timeouts))
    all_obs = np.concatenate([ds.observations, ds.next_observations]).astype(np.float64)
    delta = (ds.next_observations - ds.observations).astype(np.float64)
    stats = dict(obs_mean=t(all_obs.mean(0)), obs_std=t(all_obs.std(0) + 1e-3), obs_min=t(all_obs.min(0)),
                 obs_max=t(all_obs.max(0)), delta_mean=t(delta.mean(0)), delta_std=t(delta.std(0) + 1e-6),
                 r_mean=float(ds.rewards.mean()), r_std=float(ds.rewards.std()) + 1e-6,
                 r_min=float(ds.rewards.min()), r_max=float(ds.rewards.max()))
    if not ds.discrete:
        stats["low"], stats["high"] = (t(x) for x in action_bounds(ds))
    return data, stats


@dataclass
class Args:
    policy: tyro.conf.UseAppendAction[list[str]]
    """a checkpoint saved by `--save-model` (iql.pt, cql.pt, bcq.pt); repeat the flag to compare several policies"""
    dataset: str | None = None
    """a built-in name, a Minari id or an `.npz` path; unset: the dataset the first policy was trained on"""
    seed: int = 1
    """seed of torch and numpy; ground-truth rollout i is seeded `seed + 100 + i` (as the training scripts)"""
    device: str = "auto"
    """`auto` picks CUDA when present, else CPU; or any torch device string"""
    threads: int = 1
    """CPU threads: 1 stays fast when other processes share the cores; more only helps on an idle machine"""
    discount: float = 0.99
    """gamma of the discounted estimates (the undiscounted column always uses gamma = 1)"""
    bootstrap: int = 2000
    """bootstrap resamples of whole episodes for the 95% CIs (0: none); 2000 leave 50 per tail"""
    # Behaviour policy and importance weights
    behavior: Literal["auto", "logged", "fitted"] = "auto"
    """`logged`: the dataset's exact behavior_log_probs; `fitted`: behaviour cloning; `auto`: logged if present"""
    bc_steps: int = 5000
    """gradient steps of each behaviour-cloning fit"""
    coverage: bool = True
    """report per policy its action mass where a behaviour model fitted on all the data is thin (FQE/MB extrapolate)"""
    bc_folds: int = 2
    """cross-fitting: each of this many folds of episodes gets log pi_b from a model fitted on the others (1: none)"""
    clip_log_ratio: tuple[float, float] | None = None
    """clip each per-step log pi_e - log pi_b to [LOW, HIGH] (DOPE used -6 2): less variance, some bias. Off"""
    smoothing_width: float | None = None
    """no-density policies: Box, N(action, W^2) truncated to the box; Discrete, W-greedy. Unset: IS/DR skipped"""
    weight_threshold: float = 100.0
    """diagnostic: the share of episodes whose importance weight w_{0:H-1} exceeds this value is reported"""
    # FQE
    fqe_steps: int = 20_000
    """FQE gradient steps (DOPE ran 1,000,000; raise it when FQE has not settled; 0: skip FQE, DR and WDR)"""
    fqe_action: Literal["act", "sample"] = "act"
    """the policy FQE and MB value: `act` (the evaluation action) or `sample` (the distribution IS values)"""
    fqe_tau: float = 0.02
    """Polyak rate of FQE's target; x --fqe-steps ~ Bellman backups (20,000 x 0.02: 4 horizons at gamma .99)"""
    fqe_time_limit_terminal: bool = False
    """stop FQE's bootstrap at time limits too, to compare with the finite-horizon IS, MB and rollouts (approximate)"""
    refit_bootstrap: int = 0
    """K > 0: FQE's CI from K refits on bootstrap resamples of episodes (K times slower); 0: start states only"""
    learning_rate: float = 3e-4
    """AdamW learning rate of every fitted network (FQE, behaviour cloning, model ensemble; weight decay 1e-5)"""
    batch_size: int = 256
    """transitions per gradient step of every fitted network"""
    hidden_dim: int = 256
    """width of the hidden layers of every fitted network"""
    n_layers: int = 2
    """hidden layers of every fitted network"""
    v_samples: int = 10
    """Box: actions drawn from pi_e(.|s) to average Q over (V(s) = E_{a~pi_e} Q(s, a)); Discrete sums exactly"""
    # Model-based
    mb_ensemble: int = 5
    """number of dynamics models (each predicts s' - s, r and a termination logit from (s, a))"""
    mb_steps: int = 10_000
    """gradient steps of the model ensemble (0: skip the model-based estimate)"""
    mb_horizon: int | None = None
    """rollout length of the model; unset: the dataset's longest episode"""
    # Validation against the real environment
    rollouts: int = 0
    """run each policy this many episodes in its environment, for each estimate's error (which they do not change)"""
    rollout_action: Literal["act", "sample"] = "act"
    """what the rollouts run: `act` (the evaluation action) or `sample` (pi_e's distribution, what IS ... WDR value)"""
    plot: str | None = None
    """write a PNG of the estimates with their 95% CIs (and the rollouts' value when --rollouts > 0) to this path"""
    out: str = "{policy}.{dataset}.ope.json"
    """each policy's JSON ({policy}: its path, {dataset}: the dataset's name); one there of other settings: an error"""


RANGES = {"discount": "[0, 1]", "bootstrap": "[0, inf)", "bc_steps": "[0, inf)", "bc_folds": "[1, inf)",
          "weight_threshold": "(0, inf)", "fqe_steps": "[0, inf)", "fqe_tau": "(0, 1]", "learning_rate": "(0, inf)",
          "batch_size": "[1, inf)", "hidden_dim": "[1, inf)", "n_layers": "[0, inf)", "v_samples": "[1, inf)",
          "mb_ensemble": "[1, inf)", "mb_steps": "[0, inf)", "rollouts": "[0, inf)", "threads": "[1, inf)",
          "smoothing_width": "[0, inf)", "refit_bootstrap": "[0, inf)",
          "mb_horizon": "[1, inf)"}  # checked first: one line names the flag


def main(args: Args) -> dict[str, dict]:
    from benchmark import ope_report as report  # the table, the verdict, the files, the rollouts, several policies

    check_ranges(args, RANGES)
    if not args.policy:
        raise OPEError("no policy to evaluate: pass --policy PATH (a checkpoint saved by --save-model; repeat the "
                       "flag for several)")
    if args.clip_log_ratio is not None and args.clip_log_ratio[0] > args.clip_log_ratio[1]:
        raise OPEError(f"--clip-log-ratio {args.clip_log_ratio[0]} {args.clip_log_ratio[1]}: LOW is above HIGH")
    timed = report.Phases()  # timed(phase, fn, *a): fn(*a), its wall time added to the phase's for the summary line
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = True
    rng, device = np.random.default_rng(args.seed), pick_device(args.device)
    checkpoints = [report.read_checkpoint(p) for p in args.policy]  # fail on a missing file before any work
    if args.dataset is None:
        args.dataset = checkpoints[0]["args"].get("dataset")
        if args.dataset is None:
            raise OPEError(f"{args.policy[0]} does not say which dataset it was trained on: pass --dataset")
    ds = load_dataset(args.dataset)
    out = report.output_paths(args, ds.name)  # before any work: a file of other settings is refused, not overwritten
    ep = split_episodes(ds)
    print(f"ope.py: {ds.name}: {len(ds):,} transitions, {ep.n} episodes (longest {int(ep.lengths.max())} steps), "
          f"gamma {args.discount}", flush=True)
    data, stats = device_data(ds, device)
    obs_dim, act_dim, n_actions = dims = dataset_dims(ds)
    targets = {path: Target(report.load_target_policy(path, ds, device), n_actions, stats.get("low"), stats.get("high"),
                            args.smoothing_width, probe_obs=data["obs"][:1])
               for path in args.policy}  # rebuild and check every policy before any fitting: a wrong file fails fast
    if args.behavior == "logged" or (args.behavior == "auto" and ds.behavior_log_probs is not None):
        if ds.behavior_log_probs is None:
            raise OPEError(f"{ds.name} has no behavior_log_probs: use --behavior fitted (or auto)")
        log_pb = ds.behavior_log_probs.astype(np.float64)
        check_behavior_log_probs(log_pb, ds.name)
        behavior = "logged exact log pi_b(a|s) from the dataset"
    else:  # a cross-fitted behaviour-cloning model
        print(f"fitting the behaviour policy ({args.bc_folds}-fold cross-fitted, {args.bc_steps} steps each) ...",
              flush=True)
        log_pb, loglik, folds = timed("behaviour policy", fit_behavior, data, ep, stats, dims, args, rng)
        fit = f"{folds}-fold cross-fitted, held-out" if folds > 1 else "fitted and scored on all the data, in-sample"
        behavior = (f"ESTIMATED by behaviour cloning ({'categorical' if ds.discrete else 'truncated Gaussian'}, "
                    f"{fit} mean log-lik {loglik:.3f})")
        if ds.behavior_log_probs is not None:
            behavior += f"; mean |fitted - logged log pi_b| {np.abs(log_pb - ds.behavior_log_probs).mean():.3f}"
    print(f"behaviour policy: {behavior}", flush=True)
    coverage_model = model = None
    if args.coverage and args.bc_steps > 0:  # one behaviour model on all the data (the cross-fitted ones miss a fold)
        with progress_bar(args.bc_steps, "behaviour model for the coverage check") as bar:
            coverage_model = train_behavior_model(data, torch.arange(len(ds), device=device), stats, dims, args, bar)
    if args.mb_steps > 0:  # the model ensemble does not depend on the policy: fit it once
        print(f"fitting {args.mb_ensemble} dynamics models ({args.mb_steps} steps) ...", flush=True)
        model = DynamicsEnsemble(args.mb_ensemble, obs_dim, act_dim, n_actions, stats, args).to(device)
        timed("dynamics models", fit_model, model, data, args.mb_ensemble, args.mb_steps, args.learning_rate,
              args.batch_size)

    results = {}
    for i, (path, target) in enumerate(targets.items(), 1):
        label = f"(policy {i}/{len(targets)})"
        print(f"evaluating {path} (FQE {args.fqe_steps} steps) ...", flush=True)
        torch.manual_seed(args.seed + 3)  # each policy on the same streams, whatever the other policies and their order
        res = results[path] = timed("estimates", evaluate_policy, ds, ep, target, data, stats, log_pb, args, model,
                                    np.random.default_rng([args.seed, 3]), label, coverage_model)
        report.add_run(res, path, target, ds, args, behavior)
        if args.rollouts > 0:
            report.add_truth(res, timed("ground-truth rollouts", report.ground_truth, ds, target, args, device, label))
        res["verdict"] = report.closing_line(res)
        print(report.format_table(path, res), flush=True)
    report.write_results(results, out, args.rollouts, args.plot, timed)  # then the timings and the verdicts
    return results


if __name__ == "__main__":
    sys.excepthook = lambda kind, e, tb: (print(f"ope.py: error: {e}", file=sys.stderr, flush=True)  # one line, exit 1
                                          if issubclass(kind, UserError) else sys.__excepthook__(kind, e, tb))
    main(tyro.cli(Args))
