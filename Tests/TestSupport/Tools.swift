import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Runs external programs (QEMU's tools, the qbackup binary) for tests.
public enum Tools {
    public struct Result: Sendable {
        public var status: Int32
        public var stdout: String
        public var stderr: String
        public var stdoutData: Data
    }

    public struct MissingTool: Error, CustomStringConvertible {
        public let name: String
        /// The Debian package that has it, when not one of the usual two.
        public var package: String? = nil
        public var description: String {
            if let package { return "\(name) is not installed; install it with: apt-get install -y \(package) (or run scripts/install-deps.sh)" }
            return "\(name) is not installed; install it with: apt-get install -y qemu-utils libnbd-bin " +
                "(qemu-img, qemu-io, qemu-nbd come from qemu-utils; nbdinfo from libnbd-bin)"
        }
    }

    /// `which(name)`, naming Debian package `hint` when it is missing.
    public static func which(_ name: String, hint: String) throws -> String {
        do { return try which(name) } catch { throw MissingTool(name: name, package: hint) }
    }

    /// The full path of `name` on PATH, or throws `MissingTool` (tests fail, never skip).
    public static func which(_ name: String) throws -> String {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
        for dir in path.split(separator: ":") + ["/usr/bin", "/usr/sbin", "/usr/local/bin"] {
            let candidate = "\(dir)/\(name)"
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        throw MissingTool(name: name)
    }

    /// Runs `executable` (a name on PATH or a path) with `arguments`; never throws for a non-zero exit.
    @discardableResult
    public static func run(_ executable: String, _ arguments: [String], cwd: String? = nil,
                           environment: [String: String]? = nil) throws -> Result {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable.contains("/") ? executable : try which(executable))
        process.arguments = arguments
        if let cwd { process.currentDirectoryURL = URL(fileURLWithPath: cwd) }
        if let environment {
            process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        }
        let out = Pipe()
        let err = Pipe()
        process.standardOutput = out
        process.standardError = err
        process.standardInput = FileHandle.nullDevice
        try process.run()
        // Drain both pipes concurrently so a chatty child cannot block, stderr on a thread of its
        // own: on Dispatch's global queue each drain blocked in read holds one of its few workers
        // (one more is added per second), so parallel tests delayed each other's timed work by
        // seconds (measured: 8 blocked readers put a 1 s asyncAfter at 6.9 s).
        nonisolated(unsafe) var errData = Data()
        let drained = DispatchSemaphore(value: 0)
        Thread {
            errData = err.fileHandleForReading.readDataToEndOfFile()
            drained.signal()
        }.start()
        let outData = out.fileHandleForReading.readDataToEndOfFile()
        drained.wait()
        process.waitUntilExit()
        return Result(status: process.terminationStatus, stdout: String(decoding: outData, as: UTF8.self),
                      stderr: String(decoding: errData, as: UTF8.self), stdoutData: outData)
    }

    /// Runs a QEMU tool and throws with its stderr when it fails.
    @discardableResult
    /// A lock that a just-stopped qemu-nbd or a parallel test's forked child still holds
    /// clears within moments (slower under the sanitizers): such a failure is retried for up
    /// to 10 s. A test that expects QEMU's lock refusal uses `run` instead.
    public static func qemu(_ tool: String, _ arguments: [String], cwd: String? = nil) throws -> Result {
        var result = try run(try which(tool), arguments, cwd: cwd)
        let deadline = Date().addingTimeInterval(10)
        while result.status != 0 && result.stderr.contains("Failed to get \"") && result.stderr.contains("lock")
                && Date() < deadline {
            usleep(50_000)
            result = try run(try which(tool), arguments, cwd: cwd)
        }
        guard result.status == 0 else {
            throw ToolFailure(command: ([tool] + arguments).joined(separator: " "), result: result)
        }
        return result
    }

    public struct ToolFailure: Error, CustomStringConvertible {
        public let command: String
        public let result: Result
        public var description: String { "\(command) exited \(result.status): \(result.stderr)" }
    }

    /// `qemu-img ARGS`
    @discardableResult
    public static func qemuImg(_ arguments: String...) throws -> Result { try qemu("qemu-img", arguments) }

    /// `qemu-io -c CMD ... IMAGE` (with -f when given).
    @discardableResult
    public static func qemuIO(_ image: String, format: String? = nil, _ commands: [String]) throws -> Result {
        var args: [String] = []
        if let format { args += ["-f", format] }
        for c in commands { args += ["-c", c] }
        args.append(image)
        return try qemu("qemu-io", args)
    }
}

/// A temporary directory removed when the value is released.
public final class TempDir: @unchecked Sendable {
    public let path: String
    public init(_ prefix: String = "qbackup-test") {
        let base = FileManager.default.temporaryDirectory.path
        path = "\(base)/\(prefix)-\(UUID().uuidString.prefix(8))"
        try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    deinit { try? FileManager.default.removeItem(atPath: path) }
    /// `path/name`
    public func file(_ name: String) -> String { "\(path)/\(name)" }
}

/// A small deterministic PRNG (SplitMix64) for seeded property tests.
public struct SeededRandom: RandomNumberGenerator, Sendable {
    private var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9e37_79b9_7f4a_7c15
        var z = state
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }
}

/// Locating the built qbackup binary for CLI tests.
public enum QBackupBinary {
    /// The qbackup executable next to the test bundle (swift build puts both in one folder).
    public static func path() throws -> String {
        if let env = ProcessInfo.processInfo.environment["QBACKUP_BIN"] { return env }
        var dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        for _ in 0..<4 {
            let candidate = dir.appendingPathComponent("qbackup").path
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
            dir = dir.deletingLastPathComponent()
        }
        for candidate in [".build/debug/qbackup", ".build/release/qbackup"] where FileManager.default.isExecutableFile(atPath: candidate) {
            return FileManager.default.currentDirectoryPath + "/" + candidate
        }
        throw Tools.MissingTool(name: "qbackup binary (run swift build first)")
    }

    /// Runs `qbackup ARGS`.
    @discardableResult
    public static func run(_ arguments: [String], environment: [String: String]? = nil) throws -> Tools.Result {
        try Tools.run(try path(), arguments, environment: environment)
    }
}

extension Data {
    /// Bytes of a file, for byte-exact comparisons.
    public static func contents(of path: String) throws -> Data { try Data(contentsOf: URL(fileURLWithPath: path)) }
}

extension Tools.Result {
    /// The `qbackup: error:` lines of stderr (a usage error adds a help hint after its one line).
    public var errorLines: [Substring] {
        stderr.split(separator: "\n").filter { $0.hasPrefix("qbackup: error: ") }
    }

    /// Failed with exactly one `qbackup: error:` line, and did not crash (no signal, no backtrace).
    public var failedCleanly: Bool {
        status != 0 && status < 128 && errorLines.count == 1 && !stderr.contains("Fatal error")
            && !stderr.contains("Program crashed")
    }
}

/// A qbackup run in the background (for tests that act while it works, or kill it).
public final class RunningQBackup: @unchecked Sendable {
    public let process: Process
    private let out: String
    private let err: String

    /// Where a held run waits for its release (nil: not held).
    private let releaseFile: String?

    /// Starts `qbackup ARGS` with stdout and stderr going to files in `directory`. A `held`
    /// live backup (debug builds) waits once its export is up, before its first read, until
    /// `release()` or `wait()`: the window does not depend on the machine's speed.
    public init(_ arguments: [String], environment: [String: String] = [:], held: Bool = false,
                directory: TempDir) throws {
        let tag = UUID().uuidString.prefix(6)
        out = directory.file("qbackup-\(tag).out")
        err = directory.file("qbackup-\(tag).err")
        releaseFile = held ? directory.file("qbackup-\(tag).release") : nil
        var environment = environment
        if let releaseFile { environment["QBACKUP_DEBUG_LIVE_HOLD"] = releaseFile }
        FileManager.default.createFile(atPath: out, contents: nil)
        FileManager.default.createFile(atPath: err, contents: nil)
        process = Process()
        process.executableURL = URL(fileURLWithPath: try QBackupBinary.path())
        process.arguments = arguments
        process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        process.standardOutput = FileHandle(forWritingAtPath: out)
        process.standardError = FileHandle(forWritingAtPath: err)
        process.standardInput = FileHandle.nullDevice
        try process.run()
    }

    public var isRunning: Bool { process.isRunning }

    /// kill -9.
    public func kill() {
        if process.isRunning { Glibc.kill(process.processIdentifier, SIGKILL) }
    }

    /// Lets a held run go on.
    public func release() {
        if let releaseFile { FileManager.default.createFile(atPath: releaseFile, contents: nil) }
    }

    /// Releases a held run, waits for the exit (at most `seconds`, then kills it) and returns
    /// what it printed.
    public func wait(seconds: TimeInterval = 120) -> Tools.Result {
        release()
        let deadline = Date().addingTimeInterval(seconds)
        while process.isRunning && Date() < deadline { usleep(2_000) }
        kill()
        process.waitUntilExit()
        let stdout = (try? Data.contents(of: out)) ?? Data()
        let stderr = (try? String(contentsOfFile: err, encoding: .utf8)) ?? ""
        return Tools.Result(status: process.terminationStatus, stdout: String(decoding: stdout, as: UTF8.self),
                            stderr: stderr, stdoutData: stdout)
    }
}
