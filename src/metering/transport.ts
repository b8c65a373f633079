// How meter events reach Stripe: one call carries one event (v1 meter events) or up to 100 events of
// different customers (v2 meter event stream). The batch pipeline (batch.ts) claims groups, takes one
// slot of the call budget per call, hands the events of one call to a transport and settles each group
// from its own outcome.
import type { CallOptions, MeterEventInput, SendOutcome, StripeMeterClient } from './stripe-meter.js';

export type TransportKind = 'v1' | 'v2' | 'metronome';

export interface MeterTransport {
  readonly kind: TransportKind;
  /** Most events one call may carry, each of a different customer+meter (v1: 1, v2: 100). */
  readonly maxEventsPerCall: number;
  /**
   * One Stripe call carrying these events: one outcome per event, in order. Never throws for an
   * answer from Stripe or the network (a whole-call failure is that outcome for every event).
   */
  send(events: readonly MeterEventInput[], options?: CallOptions): Promise<SendOutcome[]>;
}

/** v1: `POST /v1/billing/meter_events`, one event per call, answered synchronously. */
export function createV1Transport(meter: Pick<StripeMeterClient, 'send'>): MeterTransport {
  return {
    kind: 'v1',
    maxEventsPerCall: 1,
    send: (events, options) => Promise.all(events.map((event) => meter.send(event, options))),
  };
}

/** Stripe Connect: the transport's calls made on a connected account (Stripe-Account / Stripe-Context). */
export function onConnectedAccount(transport: MeterTransport, account: string): MeterTransport {
  return {
    kind: transport.kind,
    maxEventsPerCall: transport.maxEventsPerCall,
    send: (events, options) => transport.send(events, { ...options, stripeAccount: account }),
  };
}

/**
 * The calls a correction group can become: a cancel by identifier, or a (negative) meter event — the
 * shape of Stripe's meter client (stripe-meter.ts). corrections.ts decides which and reads Stripe's
 * refusals; Metronome's client is metronome.ts's.
 */
export type CorrectionClient = StripeMeterClient;
