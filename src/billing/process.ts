// Applies a verified Stripe event exactly once: its id and its effect commit in one transaction.
// The insert itself is the idempotency check — checking first and recording afterwards (the old
// design) let two concurrent deliveries both pass the check.
import type { Kysely } from 'kysely';
import type { Clock } from '../clock.js';
import type { DB } from '../db/schema.js';
import type { Logger } from '../log.js';
import { defaultHandlers, type EventHandlers, type HandlerResult } from './handlers.js';
import type { VerifiedEvent } from './verify.js';

export type ProcessResult = { duplicate: true } | ({ duplicate: false } & HandlerResult);

export async function processStripeEvent(
  db: Kysely<DB>,
  event: VerifiedEvent,
  options: { log: Logger; handlers?: EventHandlers; clock: Clock },
): Promise<ProcessResult> {
  const handlers = options.handlers ?? defaultHandlers;
  const log = options.log.child({ eventId: event.id, type: event.type });
  return db.transaction().execute(async (trx) => {
    // A concurrent delivery of the same id blocks here on the primary key until the first
    // transaction ends: after a commit it sees the conflict (duplicate), after a rollback it inserts
    // and applies the event itself.
    const inserted = await trx
      .insertInto('stripe_events')
      .values({
        event_id: event.id,
        event_type: event.type,
        stripe_created: event.created,
        livemode: event.livemode,
        payload: event.raw,
        stripe_account: event.account ?? null,
      })
      .onConflict((oc) => oc.column('event_id').doNothing())
      .returning('event_id')
      .executeTakeFirst();
    if (!inserted) {
      log.debug('duplicate delivery; already applied');
      return { duplicate: true } as const;
    }
    const handler = handlers[event.type];
    const result: HandlerResult = handler
      ? await handler(trx, event, log, options.clock)
      : { outcome: 'ignored', reason: 'event type not handled' };
    log.debug({ ...result }, 'event handled');
    return { duplicate: false, ...result };
  });
}
