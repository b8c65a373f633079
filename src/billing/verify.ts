// Stripe webhook verification: the signature is checked on the exact raw body with the stripe SDK
// before anything is parsed, then the envelope is validated. Snapshot (v1) and thin (v2) events.
import Stripe from 'stripe';
import { z } from 'zod';

/** Stripe's own default and the contract: a signature older than 5 minutes is a replay. */
export const SIGNATURE_TOLERANCE_SECONDS = 300;

export type WebhookRejection =
  | 'missing_signature'
  | 'invalid_signature'
  | 'stale_signature'
  | 'invalid_event';

export class WebhookRejectedError extends Error {
  constructor(
    readonly reason: WebhookRejection,
    message: string,
  ) {
    super(message);
    this.name = 'WebhookRejectedError';
  }
}

/** The fields of an event meterbox relies on, whatever its kind. */
export interface VerifiedEvent {
  id: string;
  type: string;
  /** Stripe's `created` (1-second resolution for snapshot events). */
  created: Date;
  livemode: boolean;
  kind: 'snapshot' | 'thin';
  /** Snapshot events: `data.object`; thin events: the notification itself. */
  object: Record<string, unknown>;
  /** The body as received and verified, stored as the event's payload. */
  raw: string;
  /**
   * Stripe Connect: the connected account the event happened on (a snapshot event's `account`, a
   * thin event's `context`); null for the platform's own events.
   */
  account?: string | null;
}

const snapshotEnvelope = z.object({
  id: z.string().min(1).max(255),
  object: z.literal('event'),
  type: z.string().min(1).max(255),
  created: z.number().int().nonnegative(),
  livemode: z.boolean().optional().default(false),
  account: z.string().min(1).max(255).nullable().optional(),
  data: z.object({ object: z.record(z.string(), z.unknown()) }),
});

const thinEnvelope = z.looseObject({
  id: z.string().min(1).max(255),
  object: z.literal('v2.core.event'),
  type: z.string().min(1).max(255),
  created: z.iso.datetime({ offset: true }),
  livemode: z.boolean().optional().default(false),
  context: z.string().min(1).max(255).nullable().optional(),
});

function rejectSignature(err: Stripe.errors.StripeSignatureVerificationError): never {
  if (/tolerance/i.test(err.message)) {
    throw new WebhookRejectedError(
      'stale_signature',
      `the signature timestamp is more than ${SIGNATURE_TOLERANCE_SECONDS} seconds old`,
    );
  }
  throw new WebhookRejectedError('invalid_signature', 'the Stripe-Signature header does not match the body');
}

/**
 * The SDK only refuses signatures older than the tolerance; one dated further ahead than the
 * tolerance is refused the same way (a signing clock that far off, or a forged timestamp, is not a
 * fresh delivery). The header's `t=` is read here; a header without one fails verification anyway.
 */
function rejectFutureSignature(signatureHeader: string, receivedAtMs: number): void {
  const t = /(?:^|,)\s*t=(\d+)/.exec(signatureHeader)?.[1];
  if (t !== undefined && Number(t) * 1000 - receivedAtMs > SIGNATURE_TOLERANCE_SECONDS * 1000) {
    throw new WebhookRejectedError(
      'stale_signature',
      `the signature timestamp is more than ${SIGNATURE_TOLERANCE_SECONDS} seconds in the future`,
    );
  }
}

/**
 * Verifies `signatureHeader` over `rawBody` with `secret` and returns the event's envelope.
 * Throws WebhookRejectedError for a missing/bad/stale signature or a body that is not an event.
 * `receivedAtMs` lets a test clock decide staleness.
 */
export function verifyStripeWebhook(
  rawBody: string,
  signatureHeader: string | undefined,
  secret: string,
  receivedAtMs: number,
): VerifiedEvent {
  // Several secrets, comma-separated: Stripe signs snapshot events (a webhook endpoint) and thin
  // events (an event destination) with one secret each, and a rolled secret overlaps the new one.
  const secrets = secret
    .split(',')
    .map((s) => s.trim())
    .filter((s) => s !== '');
  let mismatch: unknown;
  for (const one of secrets) {
    try {
      return verifyWithSecret(rawBody, signatureHeader, one, receivedAtMs);
    } catch (err) {
      if (!(err instanceof WebhookRejectedError) || err.reason !== 'invalid_signature') throw err;
      mismatch = err;
    }
  }
  throw mismatch ?? new WebhookRejectedError('invalid_signature', 'no webhook secret is configured');
}

function verifyWithSecret(
  rawBody: string,
  signatureHeader: string | undefined,
  secret: string,
  receivedAtMs: number,
): VerifiedEvent {
  if (!signatureHeader) {
    throw new WebhookRejectedError('missing_signature', 'the Stripe-Signature header is missing');
  }
  rejectFutureSignature(signatureHeader, receivedAtMs);
  try {
    const event = Stripe.webhooks.constructEvent(
      rawBody,
      signatureHeader,
      secret,
      SIGNATURE_TOLERANCE_SECONDS,
      undefined,
      receivedAtMs,
    );
    const parsed = snapshotEnvelope.safeParse(event);
    if (!parsed.success) throw notAnEvent();
    return {
      id: parsed.data.id,
      type: parsed.data.type,
      created: new Date(parsed.data.created * 1000),
      livemode: parsed.data.livemode,
      kind: 'snapshot',
      object: parsed.data.data.object,
      raw: rawBody,
      account: parsed.data.account ?? null,
    };
  } catch (err) {
    if (err instanceof WebhookRejectedError) throw err;
    if (err instanceof Stripe.errors.StripeSignatureVerificationError) rejectSignature(err);
    if (err instanceof SyntaxError) throw notAnEvent();
    // constructEvent refuses thin (v2) notifications. Verify explicitly rather than rely on the
    // order of checks inside constructEvent, then read the notification's envelope.
    return verifyThin(rawBody, signatureHeader, secret, receivedAtMs);
  }
}

function verifyThin(
  rawBody: string,
  signatureHeader: string,
  secret: string,
  receivedAtMs: number,
): VerifiedEvent {
  const signature = Stripe.webhooks.signature;
  if (!signature) throw new Error('the stripe SDK has no signature helper');
  try {
    signature.verifyHeader(
      rawBody,
      signatureHeader,
      secret,
      SIGNATURE_TOLERANCE_SECONDS,
      undefined,
      receivedAtMs,
    );
  } catch (err) {
    if (err instanceof Stripe.errors.StripeSignatureVerificationError) rejectSignature(err);
    throw err;
  }
  let json: unknown;
  try {
    json = JSON.parse(rawBody);
  } catch {
    throw notAnEvent();
  }
  const parsed = thinEnvelope.safeParse(json);
  if (!parsed.success) throw notAnEvent();
  return {
    id: parsed.data.id,
    type: parsed.data.type,
    created: new Date(parsed.data.created),
    livemode: parsed.data.livemode,
    kind: 'thin',
    object: parsed.data,
    raw: rawBody,
    account: parsed.data.context ?? null,
  };
}

function notAnEvent(): WebhookRejectedError {
  return new WebhookRejectedError('invalid_event', 'the body is not a Stripe event');
}
