// Fault injection for the meter-event endpoints only: probabilities per kind, added latency, and an
// optional script of outcomes consumed first. Every decision draws from one seeded PRNG in a fixed
// order, so the same seed and the same sequence of calls give the same faults.
import { z } from 'zod';
import { createPrng, type Prng } from './prng.js';

export const FAULT_KINDS = [
  'reset',
  'timeout',
  'error_500',
  'rate_limit_429',
  'accepted_then_500',
  'accepted_then_reset',
] as const;
export type FaultKind = (typeof FAULT_KINDS)[number];
/** `none` in a script means "this call goes through untouched". */
export type ScriptStep = FaultKind | 'none';

const rate = z.number().min(0).max(1);

export const faultsSchema = z
  .object({
    /** 500 api_error before anything is recorded. */
    errorRate: rate.default(0),
    /** 429 rate_limit before anything is recorded. */
    rateLimitRate: rate.default(0),
    /** The socket is destroyed without a response, before anything is recorded. */
    resetRate: rate.default(0),
    /** The request hangs for hangMs (longer than the client's timeout), then the socket is destroyed. */
    timeoutRate: rate.default(0),
    /** The event is recorded, then the client gets a 500: only the identifier prevents double billing. */
    acceptedThen500Rate: rate.default(0),
    /** The event is recorded, then the socket is destroyed (the SDK retries it once, same idempotency key). */
    acceptedThenResetRate: rate.default(0),
    latencyMs: z.number().int().min(0).max(600_000).default(0),
    jitterMs: z.number().int().min(0).max(600_000).default(0),
    hangMs: z.number().int().min(0).max(3_600_000).default(30_000),
    /** A `Retry-After` header (seconds) on the injected 429 answers; 0: none. */
    retryAfterSeconds: z.number().int().min(0).max(86_400).default(0),
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
  .refine(
    (f) =>
      f.errorRate +
        f.rateLimitRate +
        f.resetRate +
        f.timeoutRate +
        f.acceptedThen500Rate +
        f.acceptedThenResetRate <=
      1 + 1e-9,
    { message: 'the fault rates must add up to at most 1' },
  );

export type Faults = z.output<typeof faultsSchema>;
export type FaultsInput = z.input<typeof faultsSchema>;

export const NO_FAULTS: Faults = Object.freeze(faultsSchema.parse({}));

export interface FaultDecision {
  kind: FaultKind | 'none';
  delayMs: number;
}

export class FaultInjector {
  private prng: Prng;
  private faults: Faults;
  private script: ScriptStep[];
  private drops: number;

  constructor(faults: FaultsInput, seed: number) {
    this.prng = createPrng(seed);
    this.faults = faultsSchema.parse(faults);
    this.script = [...this.faults.script];
    this.drops = this.faults.dropUnsampled;
  }

  get current(): Faults {
    return { ...this.faults, script: [...this.script], dropUnsampled: this.drops };
  }

  /** True (and one fewer left) when the next accepted v2 stream event is to be lost silently. */
  takeDrop(): boolean {
    if (this.drops <= 0) return false;
    this.drops -= 1;
    return true;
  }

  get seed(): number {
    return this.prng.seed;
  }

  /** Replaces the fault settings; a seed restarts the PRNG so the next draws repeat a run. */
  set(faults: FaultsInput, seed?: number): Faults {
    this.faults = faultsSchema.parse(faults);
    this.script = [...this.faults.script];
    this.drops = this.faults.dropUnsampled;
    if (seed !== undefined) this.prng = createPrng(seed);
    return this.current;
  }

  /** Exactly two draws per call (jitter, kind), whatever the outcome, so runs stay aligned. */
  decide(): FaultDecision {
    const f = this.faults;
    const jitterDraw = this.prng.next();
    const kindDraw = this.prng.next();
    const delayMs = f.latencyMs + Math.floor(jitterDraw * (f.jitterMs + 1));
    const scripted = this.script.shift();
    if (scripted !== undefined) return { kind: scripted, delayMs };
    const table: [FaultKind, number][] = [
      ['reset', f.resetRate],
      ['timeout', f.timeoutRate],
      ['error_500', f.errorRate],
      ['rate_limit_429', f.rateLimitRate],
      ['accepted_then_500', f.acceptedThen500Rate],
      ['accepted_then_reset', f.acceptedThenResetRate],
    ];
    let edge = 0;
    for (const [kind, p] of table) {
      edge += p;
      if (kindDraw < edge) return { kind, delayMs };
    }
    return { kind: 'none', delayMs };
  }
}
