// Fault injection for the meter-event endpoints only (the kit's injector, @meterbox/emulator-kit):
// probabilities per kind, added latency, and an optional script of outcomes consumed first; plus
// what only Stripe's emulator injects: v2 stream events lost unsampled, and customers always refused.
import {
  COMMON_FAULT_KINDS,
  commonFaultFields,
  type FaultDecision as KitDecision,
  FaultInjector as KitInjector,
  ratesAddUp,
} from '@meterbox/emulator-kit';
import { z } from 'zod';

export const FAULT_KINDS = COMMON_FAULT_KINDS;
export type FaultKind = (typeof FAULT_KINDS)[number];
/** `none` in a script means "this call goes through untouched". */
export type ScriptStep = FaultKind | 'none';

export const faultsSchema = z
  .object({
    ...commonFaultFields,
    /**
     * The next this many events the v2 stream accepts are then lost: not counted in any total and not
     * sampled into an error report (what only a reconciliation against the summaries can find).
     */
    dropUnsampled: z.number().int().min(0).max(1_000_000).default(0),
    /** Outcomes used in order for the next calls, before the rates apply. */
    script: z.array(z.enum([...FAULT_KINDS, 'none'])).default([]),
    /**
     * v1 meter events of these customers are answered 500 before anything is recorded, every time (a
     * customer Stripe keeps refusing while the others go through). Drawn from no PRNG.
     */
    failCustomers: z.array(z.string()).default([]),
  })
  .refine(...ratesAddUp);

export type Faults = z.output<typeof faultsSchema>;
export type FaultsInput = z.input<typeof faultsSchema>;

export const NO_FAULTS: Faults = Object.freeze(faultsSchema.parse({}));

export type FaultDecision = KitDecision<FaultKind>;

export class FaultInjector extends KitInjector<Faults, FaultsInput, FaultKind> {
  private drops: number;

  constructor(faults: FaultsInput, seed: number) {
    super(
      (input) => faultsSchema.parse(input),
      () => [],
      faults,
      seed,
    );
    this.drops = this.faults.dropUnsampled;
  }

  override get current(): Faults {
    return { ...super.current, dropUnsampled: this.drops };
  }

  protected override restart(): void {
    this.drops = this.faults.dropUnsampled;
  }

  /** True (and one fewer left) when the next accepted v2 stream event is to be lost silently. */
  takeDrop(): boolean {
    if (this.drops <= 0) return false;
    this.drops -= 1;
    return true;
  }

  /** The outcome of one meter-event call about `customers` (the customers its events name). */
  decide(customers: readonly string[] = []): FaultDecision {
    return this.draw(customers);
  }
}
