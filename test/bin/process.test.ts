import { describe, expect, it } from 'vitest';
import { describeError } from '../../src/bin/process.js';

describe('describeError (what a fatal error prints)', () => {
  it('prints the stack, then the cause chain and the errors inside an AggregateError', () => {
    const refused = new AggregateError(
      [new Error('connect ECONNREFUSED ::1:5432'), new Error('connect ECONNREFUSED 127.0.0.1:5432')],
      '',
    );
    const err = new Error('could not start pg-boss', { cause: refused });
    const text = describeError(err);
    expect(text).toMatch(/^Error: could not start pg-boss\n\s+at /);
    expect(text).toMatch(/\n {2}\[cause\] AggregateError:? *\n\s+at /);
    expect(text).toMatch(/\n {4}\[inner\] Error: connect ECONNREFUSED ::1:5432\n\s+at /);
    expect(text).toMatch(/\n {4}\[inner\] Error: connect ECONNREFUSED 127\.0\.0\.1:5432\n\s+at /);
  });

  it('prints a thrown non-Error as it is', () => {
    expect(describeError('boom')).toBe('boom');
    expect(describeError(42)).toBe('42');
  });
});
