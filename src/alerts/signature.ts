// The signature of an outgoing webhook, as Stripe signs its own (Stripe-Signature): the header
// `Meterbox-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>" keyed by the secret>`.
// The timestamp is the attempt's, so a captured request cannot be replayed outside the receiver's
// tolerance; the body (and the event id in it) is the same on every attempt.
import { createHmac, randomBytes } from 'node:crypto';

export const SIGNATURE_HEADER = 'Meterbox-Signature';

/** A new endpoint secret: shown once to the operator, used as the HMAC key as it is written. */
export function newEndpointSecret(): string {
  return `whsec_${randomBytes(32).toString('base64url')}`;
}

export function signatureHeader(secret: string, body: string, unixSeconds: number): string {
  const v1 = createHmac('sha256', secret).update(`${unixSeconds}.${body}`).digest('hex');
  return `t=${unixSeconds},v1=${v1}`;
}
