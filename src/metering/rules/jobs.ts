// The meter-delivery jobs a batch serves: each job's key, and what each job ends as.

import type { Destination, MeterEventName } from '../../db/schema.js';
import { type KeyRef, keyRef, singletonKeyOf } from './keys.js';

export interface DeliveryJobRef {
  id: string;
  key: KeyRef;
}

/** A meter-delivery job's payload as the queue holds it (organizationId absent in jobs from before keys had one). */
export interface DeliveryJobData {
  organizationId?: string | undefined;
  customerId: string;
  eventName: MeterEventName;
  destination?: Destination | undefined;
}

/**
 * Each job's key. A job queued before jobs named their organization takes the organization that has
 * its key's pending rows (`organizations`, by singletonKeyOf, looked up once for such jobs); one whose
 * key has no pending row left has nothing to deliver and completes.
 */
export function jobKeys(
  jobs: readonly { id: string; data: DeliveryJobData }[],
  destination: Destination,
  organizations: ReadonlyMap<string, string>,
): { refs: DeliveryJobRef[]; done: JobOutcome[] } {
  const refs: DeliveryJobRef[] = [];
  const done: JobOutcome[] = [];
  for (const job of jobs) {
    const key = { customerId: job.data.customerId, eventName: job.data.eventName, destination };
    const organizationId = job.data.organizationId ?? organizations.get(singletonKeyOf(key));
    if (organizationId) refs.push({ id: job.id, key: keyRef({ ...key, organizationId }) });
    else done.push({ id: job.id, status: 'completed', output: { kind: 'nothing_pending' } });
  }
  return { refs, done };
}

export type JobOutcome =
  | { id: string; status: 'completed'; output: { kind: string } & Record<string, unknown> }
  | { id: string; status: 'deadletter'; output: { kind: 'failed'; reason: string; message: string } };

/**
 * meter-delivery-batch jobs' keys as the meter-delivery jobs a batch takes, in slices of at most `size`
 * (the process's batch size), the jobs' keys one after another: each key a job of its own,
 * `<batch job id>/<n>`, with its batch job's attempt, which exists only in the batch (its outcome ends no
 * job row: a batch job ends when every slice is through). Several small jobs (a group's idle keys,
 * src/ingest/queued-in-statement.ts) so share one batch.
 */
export function batchJobSlices<
  T extends { id: string; retryCount: number; data: { keys: readonly DeliveryJobData[] } },
>(jobs: readonly T[], size: number): { id: string; data: DeliveryJobData; retryCount: number }[][] {
  const keys = jobs.flatMap((job) =>
    job.data.keys.map((data, n) => ({ id: `${job.id}/${n}`, data, retryCount: job.retryCount })),
  );
  const slices: { id: string; data: DeliveryJobData; retryCount: number }[][] = [];
  const step = Math.max(1, size);
  for (let i = 0; i < keys.length; i += step) slices.push(keys.slice(i, i + step));
  return slices;
}
