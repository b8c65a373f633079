// Idempotency-Key under concurrency on one node: the rules' check (test/support/idempotency-race.ts)
// through the app, keyed requests sharing the groups' one statement (single-node.ts).
import { describe } from 'vitest';
import { raceKeyedRequests } from '../support/idempotency-race.js';
import { contextTest } from '../support/test.js';

const it = contextTest();

describe('Idempotency-Key under concurrency', () => {
  it('stores one answer a key and bills what the writing answers said, whatever the order', async ({
    ctx,
    app,
  }) => {
    await raceKeyedRequests(ctx, app);
  });
});
