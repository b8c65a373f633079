// Fault injection both emulators share: the settings every destination's faults have (rates per
// kind, latency with jitter, how long a hang lasts, Retry-After on an injected 429/503), a script of
// outcomes consumed first, and the injector that decides each call's fault. Every decision draws from
// one seeded PRNG in a fixed order, so the same seed and the same sequence of calls give the same faults.
import { z } from 'zod';
import { createPrng, type Prng } from './prng.js';

/** The kinds both emulators inject; an emulator may add its own (Metronome's `error_503`). */
export const COMMON_FAULT_KINDS = [
  'reset',
  'timeout',
  'error_500',
  'rate_limit_429',
  'accepted_then_500',
  'accepted_then_reset',
] as const;

const rate = z.number().min(0).max(1);

/** The fields of every emulator's fault settings (zod shape; an emulator adds its kinds' rates and its script). */
export const commonFaultFields = {
  /** 500 before anything is recorded. */
  errorRate: rate.default(0),
  /** 429 before anything is recorded. */
  rateLimitRate: rate.default(0),
  /** The socket is destroyed without a response, before anything is recorded. */
  resetRate: rate.default(0),
  /** The request hangs for hangMs (longer than the client's timeout), then the socket is destroyed. */
  timeoutRate: rate.default(0),
  /** The events are recorded, then the client gets a 500: only the destination's dedupe prevents double billing. */
  acceptedThen500Rate: rate.default(0),
  /** The events are recorded, then the socket is destroyed. */
  acceptedThenResetRate: rate.default(0),
  latencyMs: z.number().int().min(0).max(600_000).default(0),
  /** A random 0..jitterMs added to latencyMs on every faultable call. */
  jitterMs: z.number().int().min(0).max(600_000).default(0),
  hangMs: z.number().int().min(0).max(3_600_000).default(30_000),
  /** A `Retry-After` header (seconds) on the injected 429 (and 503) answers; 0: none. */
  retryAfterSeconds: z.number().int().min(0).max(86_400).default(0),
  /**
   * Not empty: the faults (the script, the rates, the latency) are for calls about these customers only
   * (Stripe: an event's `stripe_customer_id`; Metronome: an ingested event's `customer_id`); every other
   * call goes through untouched and draws nothing. A test on a database other tests' rows share (their
   * groups sent by its worker too) gets its scripted faults on its own calls, in order.
   */
  customers: z.array(z.string().min(1)).default([]),
};

export { rate as faultRate };

/** The refinement every fault schema takes: its rates (fields named `…Rate`) add up to at most 1. */
export const ratesAddUp = [
  (f: Record<string, unknown>) =>
    Object.entries(f).reduce(
      (sum, [k, v]) => (k.endsWith('Rate') && typeof v === 'number' ? sum + v : sum),
      0,
    ) <=
    1 + 1e-9,
  { message: 'the fault rates must add up to at most 1' },
] as const;

/** What the injector needs of an emulator's parsed settings: the common fields and a script. */
export type ScriptedFaults<K extends string> = z.output<z.ZodObject<typeof commonFaultFields>> & {
  /** `none` in a script means "this call goes through untouched". */
  script: (K | 'none')[];
};

export interface FaultDecision<K extends string> {
  kind: K | 'none';
  delayMs: number;
  /** Taken from the script (not drawn from the rates). */
  scripted?: boolean;
}

/**
 * Each kind's rate in the order the kind draw reads them: the common kinds, an emulator's own kinds
 * (`extra`) after the 500 (where Metronome's 503 has always been, so a seed repeats its runs).
 */
function table<K extends string>(f: ScriptedFaults<K>, extra: readonly (readonly [K, number])[]) {
  return [
    ['reset', f.resetRate],
    ['timeout', f.timeoutRate],
    ['error_500', f.errorRate],
    ...extra,
    ['rate_limit_429', f.rateLimitRate],
    ['accepted_then_500', f.acceptedThen500Rate],
    ['accepted_then_reset', f.acceptedThenResetRate],
  ] as readonly (readonly [K | (typeof COMMON_FAULT_KINDS)[number], number])[];
}

/**
 * Decides each faultable call's fault from an emulator's settings: `parse` validates them, `extra`
 * gives the rates of the emulator's own kinds. Emulators extend it with what only they inject
 * (Stripe's lost v2 events, Metronome's per-endpoint aim).
 */
export class FaultInjector<F extends ScriptedFaults<K>, I, K extends string> {
  protected prng: Prng;
  protected faults: F;
  protected script: (K | 'none')[];

  constructor(
    private readonly parse: (input: I) => F,
    private readonly extra: (f: F) => readonly (readonly [K, number])[],
    faults: I,
    seed: number,
  ) {
    this.prng = createPrng(seed);
    this.faults = parse(faults);
    this.script = [...this.faults.script];
    // No restart() here: a subclass's fields are not set yet; it starts its own countdowns itself.
  }

  /** The settings now, the script's remaining steps included. */
  get current(): F {
    return { ...this.faults, script: [...this.script], customers: [...this.faults.customers] };
  }

  get seed(): number {
    return this.prng.seed;
  }

  /** Replaces the fault settings; a seed restarts the PRNG so the next draws repeat a run. */
  set(faults: I, seed?: number): F {
    this.faults = this.parse(faults);
    this.script = [...this.faults.script];
    this.restart();
    if (seed !== undefined) this.prng = createPrng(seed);
    return this.current;
  }

  /**
   * A call whose work failed (refused before anything was recorded: a 400) cannot lose its answer
   * after the work: a scripted accepted_then_500 or accepted_then_reset it was given goes back to the
   * front of the script, for the next call, so a script's every step strikes (a refused call, another
   * organization's or a resend's, no longer takes a scripted fault away without it happening).
   */
  unstruck(decision: FaultDecision<K>): void {
    if (
      decision.scripted === true &&
      (decision.kind === 'accepted_then_500' || decision.kind === 'accepted_then_reset')
    )
      this.script.unshift(decision.kind);
  }

  /** Called when settings are replaced: an emulator restarts what it counts down. */
  protected restart(): void {}

  /**
   * Exactly two draws per call (jitter, kind), whatever the outcome, so runs stay aligned. A call about
   * none of the `customers` the faults are for (when they name any) draws nothing and is not faulted;
   * `customers` are the call's (none known: not theirs).
   */
  protected draw(customers: readonly string[] = []): FaultDecision<K> {
    const f = this.faults;
    if (f.customers.length > 0 && !customers.some((c) => f.customers.includes(c)))
      return { kind: 'none', delayMs: 0 };
    const jitterDraw = this.prng.next();
    const kindDraw = this.prng.next();
    const delayMs = f.latencyMs + Math.floor(jitterDraw * (f.jitterMs + 1));
    const scripted = this.script.shift();
    if (scripted !== undefined) return { kind: scripted, delayMs, scripted: true };
    let edge = 0;
    for (const [kind, p] of table(f, this.extra(f))) {
      edge += p;
      if (kindDraw < edge) return { kind: kind as K, delayMs };
    }
    return { kind: 'none', delayMs };
  }
}
