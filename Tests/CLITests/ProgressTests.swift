import Foundation
import Testing
import TestSupport

/// The progress bar in a real pseudo-terminal (util-linux `script`), and the plain progress lines
/// without one.
@Suite struct ProgressTests {
    /// A repository holding one full layer of 64 MiB of data, so a restore redraws the bar a few times.
    static func repository(_ dir: TempDir) throws -> String {
        let disk = dir.file("disk.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", disk, "96M")
        try Tools.qemuIO(disk, format: "qcow2", ["write -P 7 0 64M"])
        let repo = dir.file("repo")
        let backup = try QBackupBinary.run(["backup", disk, "--repo", repo, "--no-progress"])
        #expect(backup.status == 0, "\(backup.stderr)")
        return repo
    }

    /// What a terminal of `columns` columns received while `qbackup ARGS` ran in it.
    static func inTerminal(columns: Int, cwd: String, _ arguments: [String]) throws -> String {
        let quoted = ([try QBackupBinary.path()] + arguments).map { "'\($0)'" }.joined(separator: " ")
        let result = try Tools.run(try Tools.which("script"),
                                   ["-q", "-e", "-f", "-c", "stty cols \(columns) rows 24; \(quoted)", "/dev/null"], cwd: cwd)
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        return result.stdout
    }

    static func split(_ text: String, at separators: Set<Unicode.Scalar>) -> [String] {
        var pieces: [String] = [""]
        for scalar in text.unicodeScalars {
            if separators.contains(scalar) { pieces.append("") } else { pieces[pieces.count - 1].unicodeScalars.append(scalar) }
        }
        return pieces
    }

    @Test(arguments: [60, 80])
    func barFitsTheTerminal(columns: Int) throws {
        let dir = TempDir()
        _ = try Self.repository(dir)
        // Relative names keep the command's own one-line summary on stdout short.
        let screen = try Self.inTerminal(columns: columns, cwd: dir.path,
                                         ["restore", "repo", "--to", "out.raw", "--format", "raw"])
        // Every redraw returns to column 0 and clears what an earlier, longer line left behind.
        // (Split by scalars: "\r\n" is one Character to Swift.)
        let pieces = Self.split(screen, at: ["\r", "\n"])
        let redraws = pieces.filter { $0.hasPrefix("restore [") }
        #expect(!redraws.isEmpty, "no bar drawn: \(screen.debugDescription)")
        for redraw in redraws {
            #expect(redraw.hasSuffix("\u{1B}[K"), "\(redraw.debugDescription)")
        }
        // No line (between carriage returns and newlines, escapes removed) reaches the last column.
        for line in pieces.map({ $0.replacingOccurrences(of: "\u{1B}[K", with: "") }) {
            #expect(line.count < columns, "\(line.count) columns at width \(columns): \(line)")
        }
        let last = try #require(redraws.last)
        #expect(last.contains("100.0%") && last.contains("ETA 0:00:00"), "\(last.debugDescription)")
        for redraw in redraws {
            #expect(redraw.range(of: #"ETA (\d+:\d\d:\d\d|-:--:--)"#, options: .regularExpression) != nil,
                    "\(redraw.debugDescription)")
        }
        #expect(screen.contains("restored layer 0"))
    }

    @Test func plainLinesWithoutTerminal() throws {
        let dir = TempDir()
        let repo = try Self.repository(dir)
        let result = try QBackupBinary.run(["restore", repo, "--to", dir.file("out.raw"), "--progress"])
        #expect(result.status == 0, "\(result.stderr)")
        let lines = result.stderr.split(separator: "\n").map(String.init)
        #expect(lines.count >= 2, "\(result.stderr)")
        #expect(!result.stderr.contains("\r") && !result.stderr.contains("\u{1B}"))
        for line in lines {
            #expect(line.range(of: #"^restore: \d+\.\d% .+/.+, .+/s, "#, options: .regularExpression) != nil, "\(line)")
        }
        #expect(lines.last?.contains("100.0%") == true && lines.last?.contains("done in ") == true, "\(lines)")
        // Without a terminal and without --progress: nothing on stderr.
        let quiet = try QBackupBinary.run(["restore", repo, "--to", dir.file("out2.raw")])
        #expect(quiet.status == 0 && quiet.stderr.isEmpty, "\(quiet.stderr)")
    }
}
