// Ingestion's contract (test/ingest/contract.ts) on one node: single-node.ts storeGroup, one statement a
// group.
import { afterAll, beforeAll, describe } from 'vitest';
import type { Context } from '../../src/context.js';
import { openTestContext } from '../support/database.js';
import { ingestionContract } from './contract.js';

describe('one node', () => {
  let ctx: Context;
  let close: () => Promise<void>;
  beforeAll(async () => {
    ({ ctx, close } = await openTestContext());
    await ctx.boss.start();
  });
  afterAll(async () => {
    await close?.();
  });

  ingestionContract(() => ({ ctx, distributed: false }));
});

describe('one node, a group as one statement (INGEST_GROUP_ONE_STATEMENT=on)', () => {
  let ctx: Context;
  let close: () => Promise<void>;
  beforeAll(async () => {
    ({ ctx, close } = await openTestContext());
    await ctx.boss.start();
  });
  afterAll(async () => {
    await close?.();
  });

  ingestionContract(() => ({ ctx, distributed: false, oneStatement: true }));
});
