// For tests of code that talks to an emulator: a clock the test moves by hand.

/** A clock the test moves by hand; starts at a fixed instant so the window edges are exact. */
export function manualClock(start = Date.UTC(2026, 10, 21, 10, 0, 0)) {
  let now = start;
  const clock = () => now;
  return Object.assign(clock, {
    set: (ms: number) => {
      now = ms;
    },
    advance: (ms: number) => {
      now += ms;
    },
  });
}
