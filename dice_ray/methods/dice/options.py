"""The DICE methods' options (concepts §2–§4): the run config's ``influence`` section (which probes to measure, with
which DICE-E variants, replayed after training or in the round loop), and the variants' list, which the contribution
ledger's section shares."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field

from dice_ray.sections import RECORDED, Ids, Section, comma_list, distinct


def distinct_variants(value: list[str]) -> list[str]:
    """A list of DICE-E variants as given, refused if empty or if it names one twice."""
    if not value:
        raise ValueError("needs at least one variant (first-order, curvature, second-order, exact-readout)")
    return distinct(value)


Variant = Literal["first-order", "curvature", "second-order", "exact-readout"]
SECOND_ORDER_B = ("second-order: also carry b, the perturbation's O(Δ²) part, through the local steps (one nested "
                  "forward-mode pass per step). False keeps the z′ Hessian term alone: about half the cost at a small "
                  "z′, exact to second order only in the direct term and at hop 1")
EXACT_READOUT_B = ("exact-readout: read δ = a + b (b carried as for second-order: one nested forward-mode pass per "
                   "step) instead of the curvature perturbation a alone (the default: a forward pass over z′ per "
                   "term on top of curvature's cost)")
# A list of DICE-E variants: comma-separated on the command line, each named once.
VariantList = Annotated[list[Variant], BeforeValidator(comma_list), AfterValidator(distinct_variants)]


class InfluenceConfig(Section):
    """Which probes (source j, round t, z) to measure, and how (concepts §2–§4). Off unless ``enabled``."""

    enabled: bool = Field(False, description="measure DICE-GT and DICE-E for the probes below")
    hops: int = Field(3, ge=1, le=64, description="R: steps of the cascade measured after each probe round")
    rounds: Ids = Field(None, description="probe rounds t (default: the last `last` rounds that "
                                                       "leave room for R hops)")
    every: int | None = Field(None, ge=1, description="probe every k-th round (rounds k-1, 2k-1, ...) instead of a "
                                                      "list")
    last: int = Field(10, ge=1, description="number of probe rounds when neither rounds nor every is given")
    sources: Ids = Field(None, description="probed participants j (default: all)")
    sample_sources: int | None = Field(None, ge=1, description="probe this many random participants per round")
    probe_samples: int = Field(0, ge=0, description="0: z is the whole minibatch (the paper's default); K: also "
                                                    "K single samples of it, one probe each (not with BatchNorm)")
    zprime: Literal["heldout", "validation"] = Field("heldout", description="z′: the shared held-out batch, or "
                                                                           "each target's own validation split")
    variants: VariantList = Field(
        ["first-order", "curvature"], description="DICE-E variants to compute, comma-separated (second-order: exact "
                                                  "to second order in Δ; about 3x the curvature variant's estimator "
                                                  "time at a 16-image z′, 6-7x at 360 images; exact-readout: "
                                                  "the z′ loss itself read along the curvature perturbation, "
                                                  "exact at hop 1 for whole-batch probes)")
    second_order_b: bool = Field(True, description=SECOND_ORDER_B)
    exact_readout_b: bool = Field(False, description=EXACT_READOUT_B)
    ground_truth: bool = Field(True, description="also measure DICE-GT by counterfactual replay")
    sources_per_task: int = Field(4, ge=1, description="probes of one round batched into one Ray task")
    online: bool = Field(False, description="compute DICE-E inside the round loop, in the participant groups, "
                                            "instead of on windows replayed after training (DICE-GT is still "
                                            "replayed when ground_truth is on)")

    def check(self, config: Any) -> None:
        if self.online and not self.enabled:
            raise ValueError("influence.online computes DICE-E of the influence probes: turn them on too "
                             "(--influence, influence.enabled)")
        if not self.enabled:
            return
        if self.rounds is not None and self.every is not None:
            raise ValueError("influence.rounds and influence.every both choose the probe rounds: give one "
                             "(--probe-rounds or --probe-every)")
        if self.sources is not None and self.sample_sources is not None:
            raise ValueError("influence.sources and influence.sample_sources both choose the probed participants: "
                             "give one")
        if self.sample_sources is not None and self.sample_sources > config.nodes and not RECORDED.get():
            raise ValueError(f"influence.sample_sources {self.sample_sources} exceeds the {config.nodes} "
                             "participants")
        if self.rounds == [] or self.sources == []:
            raise ValueError(f"influence.{'rounds' if self.rounds == [] else 'sources'} is empty: nothing to probe")
        latest = config.rounds - 1 - self.hops  # the last round whose R hops the run holds
        if self.every is not None and self.every - 1 > latest:
            raise ValueError(f"influence.every {self.every} probes no round: the first, {self.every - 1}, needs "
                             f"rounds up to {self.every - 1 + self.hops} but the run has rounds 0..{config.rounds - 1}")
        for t in self.rounds or []:
            if not 0 <= t <= config.rounds - 1 - self.hops:
                raise ValueError(f"influence probe round {t} needs rounds {t}..{t + self.hops} but the run has "
                                 f"rounds 0..{config.rounds - 1}")
        if config.rounds <= self.hops:
            raise ValueError(f"influence hops {self.hops} need more than {self.hops} rounds, got {config.rounds}")
        for j in self.sources or []:
            if not 0 <= j < config.nodes:
                raise ValueError(f"influence source {j} is not a participant (0..{config.nodes - 1})")
        if self.zprime == "validation" and config.data.val_fraction == 0:
            raise ValueError("influence.zprime 'validation' needs validation splits (data.val_fraction > 0)")
        if self.probe_samples > config.optim.batch_size - 1:
            raise ValueError(f"probe_samples {self.probe_samples} must be below the batch size "
                             f"{config.optim.batch_size}")
