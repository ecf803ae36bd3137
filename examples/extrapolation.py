# Extrapolation error in two states: why offline Q-learning picks an action it has never seen, and how CQL, BCQ and
# IQL avoid it. Tabular, numpy only, under a second: `python examples/extrapolation.py`. No flags.
"""The MDP (discount gamma = 0.9; `end` is terminal, its value is 0):

    s1 --left-->  end   r = 1
    s1 --right--> s2    r = 0
    s2 --wait-->  end   r = 2
    s1 --wait-->  s1    r = 0     never logged
    s2 --left-->  end   r = 0     never logged
    s2 --right--> end   r = 0     never logged

True values: Q*(s1, right) = 0 + 0.9 * 2 = 1.8 beats Q*(s1, left) = 1 and Q*(s1, wait) = 0.9 * 1.8 = 1.62.

The dataset was logged by a behaviour policy pi_b that at s1 goes left twice as often as right and at s2 always
waits: four transitions, (s1, left) twice, (s1, right) once, (s2, wait) once. So (s1, wait), (s2, left) and
(s2, right) are never seen.

Every Q-table starts from the same optimistic value Q0 = r_max / (1 - gamma) = 20, an upper bound on any return
and the usual optimistic start of online Q-learning. Online, acting on an over-estimate corrects it; offline
nothing does: a pair the data never shows keeps Q0 for ever. Extrapolation error (Fujimoto et al. 2019) is what
happens when the learner then reads such a value: through the max of the Bellman target and through the greedy
policy. The four methods below differ only in what they let read an unseen pair.
"""

from dataclasses import dataclass

import numpy as np

STATES, ACTIONS = ["s1", "s2"], ["left", "right", "wait"]
S1, S2 = 0, 1
LEFT, RIGHT, WAIT = 0, 1, 2
GAMMA = 0.9
Q0 = 20.0  # r_max / (1 - gamma) = 2 / 0.1: the initial value of every entry of every Q-table below

# the true dynamics: (s, a) -> (reward, next state), None for the terminal `end`
MDP = {(S1, LEFT): (1.0, None), (S1, RIGHT): (0.0, S2), (S1, WAIT): (0.0, S1),
       (S2, LEFT): (0.0, None), (S2, RIGHT): (0.0, None), (S2, WAIT): (2.0, None)}
LOGGED = [(S1, LEFT), (S1, LEFT), (S1, RIGHT), (S2, WAIT)]  # what pi_b did, one entry per transition


# ---------------------------------------------------------------------------------------------------------------
# The dataset: arrays of transitions (s, a, r, s', done), the pairs it covers, and the behaviour policy it implies
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Dataset:
    s: np.ndarray
    a: np.ndarray
    r: np.ndarray
    s_next: np.ndarray  # 0 (any state) where done: the (1 - done) mask removes it from every target
    done: np.ndarray


def make_dataset() -> Dataset:
    s, a = zip(*LOGGED)
    r, s_next = zip(*(MDP[pair] for pair in LOGGED))
    return Dataset(s=np.array(s), a=np.array(a), r=np.array(r),
                   s_next=np.array([0 if x is None else x for x in s_next]),
                   done=np.array([float(x is None) for x in s_next]))


def seen_pairs(data: Dataset) -> np.ndarray:
    """(states, actions) boolean: True where the dataset holds at least one transition of the pair."""
    seen = np.zeros((len(STATES), len(ACTIONS)), dtype=bool)
    seen[data.s, data.a] = True
    return seen


def behaviour_policy(data: Dataset) -> np.ndarray:
    """pi_b(a|s) estimated by counting: n(s, a) / n(s). Zero on every unseen pair."""
    counts = np.zeros((len(STATES), len(ACTIONS)))
    np.add.at(counts, (data.s, data.a), 1.0)
    return counts / counts.sum(1, keepdims=True)


def regress(q: np.ndarray, data: Dataset, y: np.ndarray) -> np.ndarray:
    """Least squares on a table: each logged Q(s, a) becomes the mean of its transitions' targets y. Every other
    entry keeps its value: no data, no gradient."""
    sums, counts = np.zeros_like(q), np.zeros_like(q)
    np.add.at(sums, (data.s, data.a), y)
    np.add.at(counts, (data.s, data.a), 1.0)
    return np.where(counts > 0, sums / np.maximum(counts, 1.0), q)


def true_q(gamma: float = GAMMA, n_iters: int = 100) -> np.ndarray:
    """Q* of the full MDP by value iteration (what a learner with every pair in its data would find)."""
    q = np.zeros((len(STATES), len(ACTIONS)))
    for _ in range(n_iters):
        for (s, a), (r, s_next) in MDP.items():
            q[s, a] = r + (0.0 if s_next is None else gamma * q[s_next].max())
    return q


# ---------------------------------------------------------------------------------------------------------------
# 1. Naive fitted Q iteration: y = r + gamma * max_a' Q(s', a'), the max over ALL actions
# ---------------------------------------------------------------------------------------------------------------
def naive_fqi(data: Dataset, gamma: float = GAMMA, q0: float = Q0, n_iters: int = 50) -> tuple[np.ndarray, int]:
    q = np.full((len(STATES), len(ACTIONS)), q0)
    for _ in range(n_iters):
        # the max reads Q(s2, left) = Q(s2, right) = Q0, which no transition ever fits: 0.9 * 20 leaks into Q(s1, right)
        y = data.r + gamma * (1 - data.done) * q[data.s_next].max(1)
        q = regress(q, data, y)
    return q, int(q[S1].argmax())  # greedy over all actions: Q(s1, wait) = Q0 wins


# ---------------------------------------------------------------------------------------------------------------
# 2. CQL(H) (Kumar et al. 2020, Eq. 4), by gradient descent on the table. Per transition (s, a, r, s'):
#    1/2 (Q(s, a) - y)^2 + alpha * (logsumexp_b Q(s, b) - Q(s, a)),   y = r + gamma * max_a' sg(Q)(s', a')
# ---------------------------------------------------------------------------------------------------------------
def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def cql(data: Dataset, alpha: float = 0.5, gamma: float = GAMMA, q0: float = Q0, lr: float = 1.0,
        n_steps: int = 3000) -> tuple[np.ndarray, int]:
    q = np.full((len(STATES), len(ACTIONS)), q0)
    for _ in range(n_steps):
        y = data.r + gamma * (1 - data.done) * q[data.s_next].max(1)  # the same target as naive FQI, held fixed
        grad = np.zeros_like(q)
        # d/dQ(s, a) of the TD term and of -alpha * Q(s, a_data): on the logged pair only
        np.add.at(grad, (data.s, data.a), (q[data.s, data.a] - y) - alpha)
        # d/dQ(s, b) of alpha * logsumexp_b Q(s, b) = alpha * softmax_b Q(s, .): on EVERY action, unseen ones included.
        # An unseen pair gets only this push, down, so it sinks below every logged one (its fixed point is -inf)
        np.add.at(grad, data.s, alpha * softmax(q[data.s]))
        q = q - lr * grad / len(data.r)  # mean over the transitions
    return q, int(q[S1].argmax())  # greedy over all actions, as naive: the unseen ones have been pushed down


# ---------------------------------------------------------------------------------------------------------------
# 3. Discrete BCQ (Fujimoto et al. 2019, discrete version): only actions with pi_b(a|s) / max_b pi_b(b|s) > threshold
#    enter the max of the target and the policy (strict ">", as the authors' code and bcq.py)
# ---------------------------------------------------------------------------------------------------------------
def bcq(data: Dataset, threshold: float = 0.3, gamma: float = GAMMA, q0: float = Q0,
        n_iters: int = 50) -> tuple[np.ndarray, int]:
    pi_b = behaviour_policy(data)
    allowed = pi_b / pi_b.max(1, keepdims=True) > threshold  # an unseen action has ratio 0: never allowed
    q = np.full((len(STATES), len(ACTIONS)), q0)
    for _ in range(n_iters):
        q_allowed = np.where(allowed, q, -np.inf)
        y = data.r + gamma * (1 - data.done) * q_allowed[data.s_next].max(1)  # max over allowed a' only
        q = regress(q, data, y)
    return q, int(np.where(allowed[S1], q[S1], -np.inf).argmax())  # the unseen Q0 = 20 is still there, never read


# ---------------------------------------------------------------------------------------------------------------
# 4. IQL (Kostrikov et al. 2021): V by expectile regression on Q at logged actions (Eq. 5), Q <- r + gamma * V(s')
#    (Eq. 6), policy by advantage-weighted behaviour cloning exp(beta * (Q - V)) (Eq. 7). No step reads an unseen Q
# ---------------------------------------------------------------------------------------------------------------
def expectile(x: np.ndarray, tau: float, n_iters: int = 50) -> float:
    """argmin_v mean L2^tau(x - v), L2^tau(u) = |tau - 1(u < 0)| u^2 (Eq. 5), by its first-order condition: v is
    the mean of x weighted tau above v and 1 - tau below. Iterated from the mean; exact once the split stops moving."""
    v = x.mean()
    for _ in range(n_iters):
        w = np.where(x > v, tau, 1 - tau)
        v = (w * x).sum() / w.sum()
    return float(v)


def iql(data: Dataset, tau: float = 0.7, beta: float = 3.0, gamma: float = GAMMA, q0: float = Q0,
        n_iters: int = 50) -> tuple[np.ndarray, int]:
    q = np.full((len(STATES), len(ACTIONS)), q0)
    v = np.zeros(len(STATES))
    for _ in range(n_iters):
        # (1) V(s) = expectile_tau of Q(s, a) over the transitions' own actions (Eq. 5): reads logged pairs only
        q_data = q[data.s, data.a]
        v = np.array([expectile(q_data[data.s == s], tau) for s in range(len(STATES))])
        # (2) Q(s, a) <- r + gamma * V(s') on logged pairs (Eq. 6): the max over a' is implicit in V's expectile
        q = regress(q, data, data.r + gamma * (1 - data.done) * v[data.s_next])
    # (3) Eq. 7 on a table: maximising sum_i exp(beta * (Q - V)) log pi(a_i|s_i) gives
    #     pi(a|s) proportional to pi_b(a|s) exp(beta * (Q(s, a) - V(s))), zero wherever pi_b is zero
    pi_b = behaviour_policy(data)
    pi = np.where(pi_b > 0, pi_b * np.exp(beta * (q - v[:, None])), 0.0)
    return q, int(pi[S1].argmax())


# ---------------------------------------------------------------------------------------------------------------
# The lesson: the four tables side by side, unseen entries marked *
# ---------------------------------------------------------------------------------------------------------------
EXPLANATION = """
All four learn from the same four transitions and start every Q-value at Q0 = 20. Naive FQI fits the logged pairs
but its target takes max_a' Q(s2, a') over every action, so the never-fitted Q(s2, left) = 20 leaks into
Q(s1, right) = 0.9 * 20 = 18, and its greedy policy in s1 picks wait, whose Q(s1, wait) = 20 no data ever
corrected: an action the dataset never shows, valued above everything it does show. CQL reads the same max, but
its logsumexp term pushes every action down in proportion to its soft-max weight while the data term pushes the
logged ones back up, so the unseen pairs sink below all logged ones and the greedy choice is a logged action; the
price is values bent towards pi_b (with alpha = 1.5 it already prefers left, the action pi_b takes most). BCQ never
considers an action that pi_b rarely or never takes (ratio to the most likely action <= 0.3), in the target or in
the policy, so the unseen 20s sit in its table unread. IQL never queries an unseen action at all: V is an
expectile of Q over the dataset's own actions, Q backs up V, and the policy re-weights pi_b, which gives unseen
actions probability zero. BCQ and IQL recover Q* on every logged pair."""


def print_tables(tables: dict[str, np.ndarray], seen: np.ndarray, gap: str = "   ") -> None:
    """Q-tables side by side: a title row, an action row, one row per state; unseen entries followed by *."""
    lines = ["    " + gap.join(f"{name:<24}" for name in tables),
             "    " + gap.join("".join(f"{a:>7} " for a in ACTIONS) for _ in tables)]
    for s in range(len(STATES)):
        lines.append(f"{STATES[s]:<4}" + gap.join("".join(f"{q[s, a]:7.2f}{' ' if seen[s, a] else '*'}"
                                                          for a in range(len(ACTIONS))) for q in tables.values()))
    print("\n".join(line.rstrip() for line in lines))


def main() -> None:
    data = make_dataset()
    seen = seen_pairs(data)
    methods = {"naive FQI": naive_fqi(data), "CQL(H), alpha 0.5": cql(data), "BCQ, threshold 0.3": bcq(data),
               "IQL, tau 0.7, beta 3": iql(data)}
    print_tables({f"Q* of the full MDP, gamma {GAMMA}": true_q()}, np.ones_like(seen))
    print(f"\nlearned from {len(data.r)} logged transitions; * = a pair they never show (Q0 = {Q0:g} until the method "
          "moves it)\n")
    print_tables({name: q for name, (q, _) in methods.items()}, seen)
    print("\naction in s1:")
    for name, (_, action) in methods.items():
        note = "  <- never logged: extrapolation error" if not seen[S1, action] else "  (logged)"
        print(f"  {name:<22} {ACTIONS[action]}{note}")
    print(EXPLANATION)


if __name__ == "__main__":
    main()
