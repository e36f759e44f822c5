import Foundation
import Testing
import TestSupport

/// `qbackup --version`: release, commit and build date, fixed at build time (scripts/build-info.sh
/// through the BuildInfo plugin), so an admin can tell which build runs on a host.
@Suite struct VersionTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()
    static let script = root.appendingPathComponent("scripts/build-info.sh").path

    /// The binary names the commit of the tree it was built from (`unknown` for a tree without git).
    @Test func versionNamesTheCommitBuilt() throws {
        let result = try QBackupBinary.run(["--version"])
        #expect(result.status == 0, "\(result.stderr)")
        let line = result.stdout
        let match = line.wholeMatch(of: /qbackup (\d+\.\d+\.\d+) \(commit ([0-9a-f]{7,40}|unknown), built (\d{4}-\d{2}-\d{2})\)\n/)
        #expect(match != nil, "'\(line)'")
        guard let match else { return }
        let git = try Tools.run(try Tools.which("git", hint: "git"), ["-C", Self.root.path, "rev-parse", "--short", "HEAD"])
        let expected = git.status == 0 ? git.stdout.trimmingCharacters(in: .whitespacesAndNewlines) : "unknown"
        #expect(String(match.2) == expected, "built from \(expected), says \(match.2)")
        // The build date is a real UTC day, not in the future.
        let today = Self.day(Date())
        #expect(String(match.3) <= today && String(match.3) >= "2025-01-01", "built \(match.3), today \(today)")
    }

    /// The generator: a fresh clone's commit; `unknown` without git, and for a tarball unpacked
    /// inside some other repository (it must not name that repository's commit);
    /// SOURCE_DATE_EPOCH fixes the date of a reproducible package.
    @Test func generatorNamesOnlyItsOwnTreesCommit() throws {
        let git = try Tools.which("git", hint: "git")
        let dir = TempDir()
        let repo = dir.file("clone")
        try FileManager.default.createDirectory(atPath: repo, withIntermediateDirectories: true)
        let identity = ["-c", "user.name=t", "-c", "user.email=t@example.org"]
        for args in [["init", "-q"], identity + ["commit", "-q", "--allow-empty", "-m", "x"]] {
            let r = try Tools.run(git, ["-C", repo] + args)
            #expect(r.status == 0, "\(r.stderr)")
        }
        let head = try Tools.run(git, ["-C", repo, "rev-parse", "--short", "HEAD"]).stdout
            .trimmingCharacters(in: .whitespacesAndNewlines)
        let nested = repo + "/unpacked-tarball"
        let plain = dir.file("plain")
        for folder in [nested, plain] {
            try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        }
        for (tree, commit) in [(repo, head), (nested, "unknown"), (plain, "unknown")] {
            let out = dir.file("out-\(UUID().uuidString.prefix(6))")
            let r = try Tools.run("/bin/sh", [Self.script, tree, out], environment: ["SOURCE_DATE_EPOCH": "1764633600"])
            #expect(r.status == 0, "\(r.stderr)")
            let text = try String(contentsOfFile: out + "/BuildInfo.swift", encoding: .utf8)
            #expect(text.contains("static let commit = \"\(commit)\""), "\(tree): \(text)")
            #expect(text.contains("static let date = \"2025-12-02\""), "\(text)")
        }
        // Without SOURCE_DATE_EPOCH: today (UTC); an unchanged result leaves the file untouched.
        let out = dir.file("today")
        try Tools.run("/bin/sh", [Self.script, plain, out])
        let file = out + "/BuildInfo.swift"
        #expect(try String(contentsOfFile: file, encoding: .utf8).contains("static let date = \"\(Self.day(Date()))\""))
        let before = try FileManager.default.attributesOfItem(atPath: file)[.modificationDate] as? Date
        usleep(20_000)
        try Tools.run("/bin/sh", [Self.script, plain, out])
        let after = try FileManager.default.attributesOfItem(atPath: file)[.modificationDate] as? Date
        #expect(before != nil && before == after)
    }

    static func day(_ date: Date) -> String {
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "UTC")
        formatter.dateFormat = "yyyy-MM-dd"
        return formatter.string(from: date)
    }
}
