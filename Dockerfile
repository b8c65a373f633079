# syntax=docker/dockerfile:1
# Multi-stage build on Node 24: compile in `build`, ship only the production entry points (server,
# worker, migrate, cli) and the migrations. The bundles carry their dependencies (scripts/bundle.mjs), so
# the image has no node_modules: no development dependency can reach it, and a process starts without
# resolving a package (test/bin/production-build.test.ts runs such a build from a directory without
# one). Development tooling (npm start's dev mode, the embedded Postgres, the Stripe emulator) is
# not bundled: packages/ (the emulator's workspace package) is not copied.
FROM node:24-bookworm-slim AS build
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json ./
COPY scripts ./scripts
COPY src ./src
COPY migrations ./migrations
RUN node scripts/build.mjs --production

FROM node:24-bookworm-slim AS runtime
# The V8 heap: without flags V8 sizes it from the host's memory (~4 GB old space, 64 MB semi-spaces on a
# large host) and the API's RSS grows past 300 MB; with these, API and worker each peak under 200 MB
# under the benchmark's load (docs/benchmarks.md, "Memory with Node's heap flags"). In NODE_OPTIONS
# rather than in CMD so they reach every command the image runs (compose's worker, migrate, the CLI,
# an orchestrator's own command); set NODE_OPTIONS to change them.
ENV NODE_ENV=production HOST=0.0.0.0 PORT=3000 \
    NODE_OPTIONS="--max-old-space-size=384 --max-semi-space-size=8"
WORKDIR /app
COPY --from=build /app/package.json ./
COPY --from=build /app/dist ./dist
COPY --from=build /app/migrations ./migrations
USER node
EXPOSE 3000
CMD ["node", "dist/server.js"]
