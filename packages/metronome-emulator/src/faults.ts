// Fault injection (the kit's injector, @meterbox/emulator-kit): probabilities per kind, added latency
// (fixed plus random 0..jitter ms), an optional script of outcomes consumed first; plus what only
// Metronome's emulator injects: a 503, and the endpoints the faults are aimed at (ingest by default).
import {
  commonFaultFields,
  faultRate,
  type FaultDecision as KitDecision,
  FaultInjector as KitInjector,
  ratesAddUp,
} from '@meterbox/emulator-kit';
import { z } from 'zod';

/** The kit's kinds and a 503. */
export const FAULT_KINDS = [
  'reset',
  'timeout',
  'error_500',
  'error_503',
  'rate_limit_429',
  'accepted_then_500',
  'accepted_then_reset',
] as const;
export type FaultKind = (typeof FAULT_KINDS)[number];
/** `none` in a script means "this call goes through untouched". */
export type ScriptStep = FaultKind | 'none';

/** The API surfaces faults can be aimed at. */
export const FAULT_ENDPOINTS = ['ingest', 'usage', 'search', 'customers', 'billable_metrics'] as const;
export type FaultEndpoint = (typeof FAULT_ENDPOINTS)[number];

export const faultsSchema = z
  .object({
    ...commonFaultFields,
    /** 503 before anything is recorded. */
    unavailableRate: faultRate.default(0),
    /** Outcomes used in order for the next faultable calls, before the rates apply. */
    script: z.array(z.enum([...FAULT_KINDS, 'none'])).default([]),
    /** Which endpoints the faults and the latency apply to. */
    endpoints: z.array(z.enum(FAULT_ENDPOINTS)).default(['ingest']),
  })
  .refine(...ratesAddUp);

export type Faults = z.output<typeof faultsSchema>;
export type FaultsInput = z.input<typeof faultsSchema>;

export type FaultDecision = KitDecision<FaultKind>;

export const NO_FAULT: FaultDecision = Object.freeze({ kind: 'none', delayMs: 0 });

export class FaultInjector extends KitInjector<Faults, FaultsInput, FaultKind> {
  constructor(faults: FaultsInput, seed: number) {
    super(
      (input) => faultsSchema.parse(input),
      (f) => [['error_503', f.unavailableRate]],
      faults,
      seed,
    );
  }

  override get current(): Faults {
    const current = super.current;
    return { ...current, endpoints: [...current.endpoints] };
  }

  /**
   * The outcome of one call to `endpoint` about `customers` (an ingest call's events' customer_id).
   * Calls outside the configured endpoints, or about none of the faults' `customers` when they name
   * any, draw nothing; the others draw exactly twice (jitter, kind) whatever the outcome, so runs stay
   * aligned.
   */
  decide(endpoint: FaultEndpoint, customers: readonly string[] = []): FaultDecision {
    if (!this.faults.endpoints.includes(endpoint)) return NO_FAULT;
    return this.draw(customers);
  }
}
