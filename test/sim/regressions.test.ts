// Seeds of the delivery simulation (scripts/sim) that once failed, each kept with what it found. Each
// fails again if its fix is undone (checked by undoing it when the seed was recorded); see
// docs/architecture.md, "What the simulation found".
import { describe, expect, it } from 'vitest';
import { simulate } from '../../scripts/sim/simulation.js';

const FOUND = [
  {
    seed: 22,
    size: 'full',
    what: 'a redrive put several groups of one key back in flight; the claim said nothing was left beyond the one it resent, so the others waited for the sweep, one a minute',
  },
  {
    seed: 35,
    size: 'small',
    what: 'the same, in a small world without a crash',
  },
  {
    seed: 6,
    size: 'small',
    what: 'a redriven group kept its spent attempts: its first retryable answer after the redrive dead-lettered it again',
  },
  {
    seed: 141,
    size: 'small',
    what: 'corrections whose original usage was sent in the same batch got no follow-up and waited for the sweep',
  },
  {
    seed: 47,
    size: 'small',
    what: 'the same, with a dead letter in between',
  },
  {
    seed: 28,
    size: 'small',
    what: 'a worker killed between fetching its jobs and leasing their keys left the jobs active and the keys uncovered until pg-boss expired them or the sweep came (minutes); the reaper now frees such jobs within a lease',
  },
  {
    seed: 41,
    size: 'full',
    what: 'groups past the identifier window could not be reconciled hour by hour when several shared an hour; minute windows and the one subset that explains the total settle them',
  },
  {
    seed: 10258,
    size: 'small',
    what: 'two failed groups of 3 in one minute, the destination counting 3: the reconciled redrive rightly leaves them ambiguous, and the ledger check counted the one Stripe holds as billed and not delivered (the check now takes what the destination holds of the groups left ambiguous, by identifier, and requires every other row settled)',
  },
  ...[1280, 1311, 430].map((seed) => ({
    seed,
    size: 'small' as const,
    hostile: true,
    what: 'a meter error report (a webhook) committed and answered 200 just before the primary died; the asynchronous standby lacked it, Stripe never sent it again, and its rows stayed delivered while Stripe had dropped their event (billed less than stored): the webhook is now answered only once the standbys have it',
  })),
  ...[2043, 2131].map((seed) => ({
    seed,
    size: 'small' as const,
    hostile: true,
    what: "a meter error report came before the worker settled its call's answer (slow statements, freezes): it changed no row, the settle then marked the rows delivered though Stripe had dropped their event (billed less than stored); a report now fails the pending rows it names too",
  })),
  {
    seed: 1533,
    size: 'small',
    hostile: true,
    what: "a worker frozen between its lease check and its cancel sent it after another worker's cancel of the same identifier had gone out: the one-call-in-flight check exempted late meter events but not late cancels (the check now watches late cancels apart, as late events, and requires every cancel of one identifier in flight at once to carry one idempotency key: a replay)",
  },
  {
    seed: 10681,
    size: 'small',
    what: 'the reaper freed a lease whose settle ran late, and queued the key in a later statement that was slow (22 s); the batch completed its own job meanwhile and the key had neither a lease nor a job: the reaper now queues the keys before it frees their leases',
  },
  {
    seed: 1594,
    size: 'small',
    hostile: true,
    // The world as it was found: the error-report fixes of seeds 430-2131 change the random stream, and
    // 1594 passed by chance after them. Their two rules broken again draw it as it was (102 rows -> 94).
    mutations: ['webhookNoStandbyWait', 'reportSparesUnsettled'],
    what: "a reading stamped 3.5 min ahead waited for its time, then for the sweep (33 s, by design); the sweep's job was fetched and its claim's worker killed 2 ms later, between two checks; the reaper gave it back 12 s later. The coverage check counted the wait from the reading's due time against the 35 s a crash allows: it now counts a key's wait from the last instant a job of it was queued due or fetched",
  },
  {
    seed: 14519,
    size: 'small',
    hostile: true,
    what: "the same model's error as seed 3454 (below), found by the search around it: a worker killed at 00:03:58.4 had its claim (slowed by the slow-statement fault) committed by the model at 00:04:21.4, 23 s later; the key went 27 s without a job",
  },
  {
    seed: 3454,
    size: 'small',
    hostile: true,
    what: "the model's error: a worker killed in the middle of a claim the slow-statement fault made last about 25 s; the model ran the claim to its end and committed its lease for the dead worker 19.5 s after the kill, so the key waited 25 s for the reaper (the bound: 2 leases of 5 s + 15 s). In Postgres such a claim never commits (its transaction's COMMIT is sent only after the claim's answer) and is stopped and rolled back within a second (DB_SERVER_TIMEOUTS' client_connection_check_interval; a silent host: keepalive, about 11 s; test/metering/killed-claim.test.ts): the model now rolls back a dead worker's statement still running 11 s after the death",
  },
  {
    seed: 3914,
    size: 'small',
    hostile: true,
    what: 'two renewals of one batch in flight together: one sent during a claim the slow-statement fault made last 24 s (a 5 s lease), then, after the claim, one for the lease grown to 73 s, which moved the deadline; the slow one landed last and cut the lease back to 5 s, and the batch called 9 s after its lease had run out. A renewal now only ever extends a lease (renewLeasesOf: greatest)',
  },
  {
    // Found as seed 364; since batch fetchers are as many as per-key fetchers 364's world runs otherwise
    // (its kills leave no key of a batch job to the sweep), and 217 shows the same: held to the old bound,
    // its third key fails the coverage check (76 s without a job or hold) as 364's did.
    seed: 217,
    size: 'small',
    hostile: true,
    what: "the hourly report's meter-delivery-batch job: a worker fetched it and was killed in its second slice (batch size 1); the third key was neither leased nor queued, so the reaper had nothing of it, and its row waited for the sweep (its active batch job covers nothing there, sweep.ts). The coverage check held it to a crash's two leases and a reaper pass; a key a dead worker's batch job had not taken through is now held to the sweep's bound, the design's for it",
  },
  {
    seed: 339,
    size: 'small',
    hostile: true,
    what: "an hourly report's row of count 0 never reached Stripe (an outage: every call 500) and was dead-lettered; a day later the reconciled redrive found Stripe's total for its minute 0, its value, and marked it delivered (rules/reconcile.ts took a `last` group as present when the total is its value), and Stripe kept the count before it as the meter's last value. A reconciled redrive now never takes a 0 as present: it is sent again (a second 0 at its time changes no `last` value), and the per-row ledger check takes no 0 as billed unless the destination holds it",
  },
] as const;

describe('seeds the simulation once failed on', () => {
  it.for(FOUND)('seed $seed ($size): $what', { timeout: 120_000 }, async (found) => {
    const hostile = 'hostile' in found && found.hostile;
    const mutations = 'mutations' in found ? [...found.mutations] : [];
    const result = await simulate(found.seed, {}, found.size, { hostile, mutations });
    expect(result.violations, result.contexts[0]?.join('\n')).toEqual([]);
    expect(result.ok).toBe(true);
  });

  it('full-size worlds: more customers, longer runs, readings seconds apart', {
    timeout: 180_000,
  }, async () => {
    const failed: number[] = [];
    for (let seed = 1_000_001; seed <= 1_000_010; seed++) {
      const result = await simulate(seed, {}, 'full');
      if (!result.ok) failed.push(seed);
    }
    expect(failed, `replay with npm run sim -- --seed N`).toEqual([]);
  });
});
