import Foundation

/// Crash-point enumeration through the debug build's QBACKUP_CRASH_AFTER seam: a command is
/// run once per step n = 1, 2, ... with QBACKUP_CRASH_AFTER=n (it kills itself after its n-th
/// write or fsync) until a run gets past every write and exits 0; each run's aftermath is
/// checked by the caller.
public enum CrashPoints {
    public struct Outcome: Sendable {
        /// A run exited 0 (the command finished) before the steps ran out.
        public var completed = false
        /// How many runs ended without finishing (crash points exercised).
        public var crashes = 0
    }

    /// Calls `attempt(n, environment)` for n = 1, 2, ... (every `stride`-th n from `denseSteps` on)
    /// while n < `limit`, until the run it returns exited 0. `attempt` prepares a fresh copy, runs
    /// the command with `environment` (QBACKUP_CRASH_AFTER=n), checks what the run left, and
    /// returns that run's result.
    public static func enumerate(limit: Int, denseSteps: Int = .max, stride: Int = 1,
                                 _ attempt: (_ step: Int, _ environment: [String: String]) throws -> Tools.Result)
        throws -> Outcome
    {
        var outcome = Outcome()
        var n = 1
        while !outcome.completed && n < limit {
            let result = try attempt(n, ["QBACKUP_CRASH_AFTER": String(n)])
            if result.status == 0 { outcome.completed = true } else { outcome.crashes += 1 }
            n += n < denseSteps ? 1 : stride
        }
        return outcome
    }
}
