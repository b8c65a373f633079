// Ingestion's contract (test/ingest/contract.ts) on one node: single-node.ts storeGroup, one statement a
// group in a transaction; and with INGEST_GROUP_ONE_STATEMENT=on, storeGroupAtOnce in autocommit.
import { afterAll, beforeAll, describe } from 'vitest';
import type { Context } from '../../src/context.js';
import { openTestContext } from '../support/database.js';
import { ingestionContract } from './contract.js';

for (const oneStatement of [false, true]) {
  describe(
    oneStatement ? 'one node, a group as one statement (INGEST_GROUP_ONE_STATEMENT=on)' : 'one node',
    () => {
      let ctx: Context;
      let close: () => Promise<void>;
      beforeAll(async () => {
        ({ ctx, close } = await openTestContext());
        await ctx.boss.start();
      });
      afterAll(async () => {
        await close?.();
      });

      ingestionContract(() => ({ ctx, distributed: false, ...(oneStatement ? { oneStatement: true } : {}) }));
    },
  );
}
