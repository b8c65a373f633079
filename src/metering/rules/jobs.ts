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
 * A meter-delivery-batch job's keys as the meter-delivery jobs a batch takes, in slices of at most
 * `size` (the process's batch size): each key a job of its own, `<batch job id>/<n>`, which exists only
 * in the batch (its outcome ends no job row: the batch job ends when every slice is through).
 */
export function batchJobSlices<T extends { id: string; data: { keys: readonly DeliveryJobData[] } }>(
  job: T,
  size: number,
): { id: string; data: DeliveryJobData }[][] {
  const slices: { id: string; data: DeliveryJobData }[][] = [];
  const step = Math.max(1, size);
  for (let i = 0; i < job.data.keys.length; i += step) {
    slices.push(job.data.keys.slice(i, i + step).map((data, n) => ({ id: `${job.id}/${i + n}`, data })));
  }
  return slices;
}
