//! The rolling plan, pure: how far a rollout may go beyond and below a service's desired count
//! (from the manifest's `deployment` percentages, rounded as Kubernetes rounds them), and which
//! step comes next. The local runtime follows [`next_step`]; the Kubernetes runtime hands the
//! same percentages to the cluster as a Deployment's `rollingUpdate`.

use crate::manifest::Deployment;

/// The rollout bounds of a service, as percentages of its desired count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Percentages {
    /// Extra instances allowed during a rollout (`maximum` above 100%).
    pub surge: u32,
    /// Instances that may be missing during a rollout (`minimum` below 100%).
    pub unavailable: u32,
}

impl Percentages {
    /// The bounds of a manifest's `deployment` block.
    pub fn of(deployment: &Deployment) -> Self {
        Self {
            surge: deployment.maximum.saturating_sub(100),
            unavailable: 100u32.saturating_sub(deployment.minimum),
        }
    }

    /// As a Kubernetes Deployment's `maxSurge` and `maxUnavailable`.
    pub fn rolling_update(self) -> (String, String) {
        (format!("{}%", self.surge), format!("{}%", self.unavailable))
    }

    /// The bounds for `desired` instances, in instances.
    pub fn budget(self, desired: usize) -> Budget {
        let desired = desired as u64;
        // Kubernetes rounds the surge up and the unavailability down.
        let surge = (desired * u64::from(self.surge)).div_ceil(100);
        let unavailable = desired * u64::from(self.unavailable) / 100;
        let (surge, unavailable) = (surge as usize, unavailable as usize);
        // At least one of them is not zero, or nothing could ever be replaced.
        if surge == 0 && unavailable == 0 {
            Budget {
                desired: desired as usize,
                surge: 1,
                unavailable: 0,
            }
        } else {
            Budget {
                desired: desired as usize,
                surge,
                unavailable,
            }
        }
    }
}

/// A service's rollout bounds, in instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub desired: usize,
    pub surge: usize,
    pub unavailable: usize,
}

/// The instances of a service during a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Of the release being rolled out, starting or ready.
    pub new: usize,
    /// Of them, those that passed their health check.
    pub new_ready: usize,
    /// Of earlier releases (still serving).
    pub old: usize,
}

/// The next step of a rolling update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Start an instance of the new release and wait until it is ready.
    StartNew,
    /// Stop the oldest instance of an earlier release.
    StopOld,
    /// Wait until a new instance that is still starting is ready (or has failed): one
    /// found running after a restart, or left by a rollout that was taken over.
    AwaitNew,
    /// Enough new instances are ready: stop what is left of the old ones, and any extra new.
    Finish,
}

/// What to do next with `counts` under `budget`: start a new instance while the surge allows
/// it (or when nothing old is left to stop); stop an old one while availability stays within
/// the budget; when neither is allowed, exceed the surge rather than drop below the minimum.
pub fn next_step(budget: Budget, counts: Counts) -> Step {
    if counts.new_ready >= budget.desired {
        return Step::Finish;
    }
    if counts.new > counts.new_ready {
        return Step::AwaitNew;
    }
    let within_surge = counts.old + counts.new < budget.desired + budget.surge;
    let can_lose_one = counts.old + counts.new_ready > budget.desired.saturating_sub(budget.unavailable);
    if within_surge || counts.old == 0 || !can_lose_one {
        Step::StartNew
    } else {
        Step::StopOld
    }
}

/// After a new instance became ready: whether an old one may go now (capacity stays at the
/// desired count).
pub fn retire_after_ready(budget: Budget, counts: Counts) -> bool {
    counts.old > 0 && counts.new_ready + counts.old > budget.desired
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pct(minimum: u32, maximum: u32) -> Percentages {
        Percentages::of(&Deployment {
            minimum,
            maximum,
            ..Deployment::default()
        })
    }

    #[test]
    fn budgets_follow_kubernetes_rounding() {
        let b = |desired, min, max| {
            let b = pct(min, max).budget(desired);
            (b.surge, b.unavailable)
        };
        assert_eq!(b(1, 50, 200), (1, 0));
        assert_eq!(b(3, 50, 200), (3, 1));
        assert_eq!(b(4, 75, 125), (1, 1));
        assert_eq!(b(2, 100, 100), (1, 0));
        assert_eq!(b(2, 50, 100), (0, 1));
        assert_eq!(pct(25, 150).rolling_update(), ("50%".to_owned(), "75%".to_owned()));
        assert_eq!(pct(100, 150).rolling_update(), ("50%".to_owned(), "0%".to_owned()));
    }

    /// Simulates a rollout step by step (new instances become ready at once) and returns the
    /// most instances that ran at once and the fewest ready ones.
    fn simulate(desired: usize, old: usize, percentages: Percentages) -> (usize, usize, Vec<Step>) {
        let budget = percentages.budget(desired);
        let mut counts = Counts {
            new: 0,
            new_ready: 0,
            old,
        };
        let (mut most, mut fewest_ready, mut steps) = (old, old, Vec::new());
        loop {
            let step = next_step(budget, counts);
            steps.push(step);
            match step {
                Step::Finish => return (most, fewest_ready, steps),
                Step::StartNew => {
                    counts.new += 1;
                    most = most.max(counts.new + counts.old);
                    counts.new_ready += 1;
                    if retire_after_ready(budget, counts) {
                        counts.old -= 1;
                    }
                }
                Step::StopOld => counts.old -= 1,
                Step::AwaitNew => counts.new_ready = counts.new,
            }
            fewest_ready = fewest_ready.min(counts.new_ready + counts.old);
            assert!(steps.len() < 100, "the rollout never ends: {steps:?}");
        }
    }

    #[test]
    fn rollouts_stay_within_their_budget() {
        // Default bounds (50%/200%): three new instances start before old ones go.
        let (most, fewest, _) = simulate(3, 3, pct(50, 200));
        assert!(most <= 6 && fewest >= 3, "{most} {fewest}");
        // No surge (minimum 50, maximum 100): old instances go first, never below half.
        let (most, fewest, steps) = simulate(2, 2, pct(50, 100));
        assert_eq!(most, 2);
        assert_eq!(fewest, 1);
        assert_eq!(steps[0], Step::StopOld);
        // Full availability (100/150): never fewer than desired.
        let (_, fewest, _) = simulate(4, 4, pct(100, 150));
        assert_eq!(fewest, 4);
        // A first deployment just starts what it needs.
        let (most, _, steps) = simulate(2, 0, pct(50, 200));
        assert_eq!((most, steps.len()), (2, 3));
    }

    #[test]
    fn starting_instances_are_awaited_before_more_are_started() {
        // Adopted after a restart: one instance of the release, not checked yet.
        let budget = pct(50, 200).budget(1);
        assert_eq!(
            next_step(
                budget,
                Counts {
                    new: 1,
                    new_ready: 0,
                    old: 0
                }
            ),
            Step::AwaitNew
        );
        assert_eq!(
            next_step(
                budget,
                Counts {
                    new: 1,
                    new_ready: 1,
                    old: 0
                }
            ),
            Step::Finish
        );
        let three = pct(50, 200).budget(3);
        assert_eq!(
            next_step(
                three,
                Counts {
                    new: 2,
                    new_ready: 1,
                    old: 3
                }
            ),
            Step::AwaitNew
        );
    }

    #[test]
    fn nothing_old_and_nothing_to_lose_means_start() {
        let budget = pct(100, 100).budget(1);
        assert_eq!(
            next_step(
                budget,
                Counts {
                    new: 0,
                    new_ready: 0,
                    old: 1
                }
            ),
            Step::StartNew
        );
        assert_eq!(
            next_step(
                budget,
                Counts {
                    new: 1,
                    new_ready: 1,
                    old: 1
                }
            ),
            Step::Finish
        );
    }
}
