import Foundation
import Testing
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

/// The sshd fixture (Tests/TestSupport/SSHServer.swift) that the replication and qemu+ssh tests
/// log in through: a real login with its key, rsync over its `sshCommand`, a stop by PID that
/// frees the port, and a start that fails (here: a bad config line) ends with sshd's own log
/// instead of hanging, with no child left behind.
@Suite struct SSHServerTests {
    @Test func logsInRunsRsyncAndStopsByPID() throws {
        let server = try SSHServer()
        #expect(server.isRunning)
        let echo = try server.run("echo hello-$((6*7))")
        #expect(echo.status == 0, "\(echo.stderr)")
        #expect(echo.stdout == "hello-42\n")
        // The remote side's exit status comes back (qbackup's replicate relies on it).
        #expect(try server.run("exit 3").status == 3)

        // rsync -e takes sshCommand as it is.
        let dir = TempDir()
        let source = dir.file("source")
        try FileManager.default.createDirectory(atPath: source, withIntermediateDirectories: true)
        let bytes = Data((0..<100_000).map { UInt8(truncatingIfNeeded: $0 &* 7) })
        try bytes.write(to: URL(fileURLWithPath: source + "/file"))
        let rsync = try Tools.run(try Tools.which("rsync", hint: "rsync"),
                                  ["-a", "-e", server.sshCommand, source + "/", "\(server.destination):\(dir.file("copy"))/"])
        #expect(rsync.status == 0, "\(rsync.stderr)")
        #expect(try Data.contents(of: dir.file("copy/file")) == bytes)

        // The known_hosts file names the host key, so a checking client gets in too.
        let strict = try Tools.run(try Tools.which("ssh"),
                                   ["-p", String(server.port), "-i", server.keyFile, "-o", "IdentitiesOnly=yes",
                                    "-o", "StrictHostKeyChecking=yes", "-o", "UserKnownHostsFile=\(server.knownHostsFile)",
                                    "-o", "BatchMode=yes", server.destination, "true"])
        #expect(strict.status == 0, "\(strict.stderr)")

        let port = server.port
        server.stop()
        #expect(!server.isRunning)
        // Nothing listens on the port any more: a login is refused at once.
        let after = try Tools.run(try Tools.which("ssh"),
                                  ["-p", String(port), "-i", server.keyFile, "-o", "BatchMode=yes",
                                   "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                                   "-o", "ConnectTimeout=5", "\(server.user)@127.0.0.1", "true"])
        #expect(after.status == 255)
        #expect(after.stderr.contains("refused"), "\(after.stderr)")
        #expect(Self.lingeringZombies() == [])
    }

    /// A server that cannot start throws at once with sshd's `-e` log, and leaves no zombie.
    @Test func aFailedStartReportsSshdsLog() throws {
        let started = Date()
        #expect {
            _ = try SSHServer(extraConfig: ["NoSuchOption yes"])
        } throws: { error in
            let text = "\(error)"
            return text.contains("sshd exited before it answered") && text.contains("NoSuchOption")
        }
        #expect(Date().timeIntervalSince(started) < 20)
        #expect(Self.lingeringZombies() == [])
    }

    /// A probe that never ends is killed and reaped at its deadline.
    @Test func aChildThatHangsIsKilledAndReaped() throws {
        let dir = TempDir()
        let started = Date()
        let result = try ChildProcess.run("/bin/sleep", ["30"], seconds: 0.5, directory: dir)
        #expect(result.status == -1)
        #expect(result.stderr.hasPrefix("timed out"))
        #expect(Date().timeIntervalSince(started) < 5)
        #expect(Self.lingeringZombies() == [])
    }

    /// The zombie children that stay zombies: those seen now that are still unreaped after
    /// `grace` seconds. Other tests in this process run sshd and ssh too, and each of their
    /// children is a zombie for a moment between its exit and the fixture's next `waitpid` (up to
    /// a 5 s probe, or stop's 10 s SIGTERM grace). A child nobody reaps stays one for good.
    static func lingeringZombies(grace: TimeInterval = 15) -> [String] {
        let deadline = Date().addingTimeInterval(grace)
        var zombies = Set(zombieChildren())
        while !zombies.isEmpty && Date() < deadline {
            usleep(50_000)
            zombies.formIntersection(zombieChildren())
        }
        return zombies.sorted()
    }

    /// This process's children (over all its threads) that are zombies, as "pid name".
    static func zombieChildren() -> [String] {
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? []
        let children = tasks.flatMap { task in
            ((try? String(contentsOfFile: "/proc/self/task/\(task)/children", encoding: .utf8)) ?? "").split(separator: " ")
        }
        return children.compactMap { child in
            guard let stat = try? String(contentsOfFile: "/proc/\(child)/stat", encoding: .utf8),
                  let close = stat.lastIndex(of: ")")
            else { return nil }
            let state = stat[stat.index(after: close)...].trimmingCharacters(in: .whitespaces).prefix(1)
            let name = stat.split(separator: " ").dropFirst().first ?? ""
            return state == "Z" && (name == "(ssh)" || name == "(sshd)" || name == "(sleep)") ? "\(child) \(name)" : nil
        }
    }
}
