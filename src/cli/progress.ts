// A progress bar for long CLI operations, drawn on stderr so stdout stays a clean table or JSON.
// On a terminal it redraws one line; elsewhere (CI logs, pipes) it prints one summary line at the end.

export interface ProgressStream {
  isTTY?: boolean;
  columns?: number;
  write(chunk: string): unknown;
}

export interface ProgressBar {
  update(done: number, total: number): void;
  finish(): void;
}

export function createProgressBar(
  stream: ProgressStream,
  label: string,
  options: { now?: () => number } = {},
): ProgressBar {
  const now = options.now ?? (() => performance.now());
  let last = -Infinity;
  let state = { done: 0, total: 0 };
  let drawn = false;
  const render = () => {
    const { done, total } = state;
    const ratio = total > 0 ? Math.min(1, done / total) : 1;
    const width = Math.max(10, Math.min(40, (stream.columns ?? 80) - label.length - 30));
    const filled = Math.round(ratio * width);
    return `${label} [${'█'.repeat(filled)}${'░'.repeat(width - filled)}] ${done}/${total} ${Math.round(ratio * 100)}%`;
  };
  return {
    update(done, total) {
      state = { done, total };
      if (!stream.isTTY) return;
      // Redraw at most ten times a second: a terminal write per row would dominate the run time.
      const t = now();
      if (t - last < 100 && done < total) return;
      last = t;
      stream.write(`\r\x1b[K${render()}`);
      drawn = true;
    },
    finish() {
      if (stream.isTTY) {
        if (drawn) stream.write(`\r\x1b[K${render()}\n`);
      } else if (state.total > 0) {
        stream.write(`${label}: ${state.done}/${state.total}\n`);
      }
    },
  };
}
