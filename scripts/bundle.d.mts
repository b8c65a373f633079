import type { BuildOptions } from 'esbuild';

export function bundle(
  entryPoints: { in: string; out: string }[],
  outdir: string,
  extra?: BuildOptions,
): Promise<void>;
