import Foundation
import Testing
import TestSupport

/// Issue 17 item 14: qbackup(1) as scripts/man-page.sh generates it from the argument parser
/// (the page the .deb installs) reads right: man renders it without a warning within 80 columns,
/// and it has every command and every option the parser of the binary under test shows
/// (`--experimental-dump-help`), so a stale page fails too. The page is made beforehand: the
/// generate-manual plugin waits for the build folder's lock, which `swift test` holds (CI runs
/// scripts/package-deb.sh, which writes it, before the suite under AddressSanitizer).
@Suite struct ManualTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()

    /// Each command path (bitmap's subcommands as "bitmap list", …) with its abstract and the long
    /// names of the options it shows.
    static func commands(_ node: [String: Any], path: [String] = []) -> [(path: [String], abstract: String, options: [String])] {
        let here = path
        let options = (node["arguments"] as? [[String: Any]] ?? []).filter { $0["shouldDisplay"] as? Bool == true }
            .flatMap { ($0["names"] as? [[String: Any]] ?? []).filter { $0["kind"] as? String == "long" } }
            .compactMap { $0["name"] as? String }
        var out = [(here, node["abstract"] as? String ?? "", options)]
        for sub in node["subcommands"] as? [[String: Any]] ?? [] where sub["commandName"] as? String != "help" {
            out += commands(sub, path: here + [sub["commandName"] as? String ?? ""])
        }
        return out
    }

    @Test func theManPageIsGeneratedAndReadable() throws {
        let page = Self.root.appendingPathComponent(".build/man/qbackup.1").path
        guard let source = try? String(contentsOfFile: page, encoding: .utf8) else {
            Issue.record("no \(page): run 'bash scripts/man-page.sh' first (it needs swift-argument-parser's generate-manual plugin)")
            return
        }
        let rendered = try Tools.run(try Tools.which("man", hint: "man-db"), ["--warnings=w", "-l", page],
                                     environment: ["MANWIDTH": "80", "LANG": "C.UTF-8", "MANPAGER": "cat", "PAGER": "cat"])
        #expect(rendered.status == 0, "\(rendered.stderr)")
        #expect(rendered.stderr.isEmpty, "man warns: \(rendered.stderr)")
        let lines = rendered.stdout.split(separator: "\n", omittingEmptySubsequences: false)
        #expect(lines.count > 300, "\(lines.count) lines")
        #expect(lines.first?.hasPrefix("QBACKUP(1)") == true, "\(lines.first ?? "")")
        let wide = lines.filter { $0.count > 80 }
        #expect(wide.isEmpty, "lines wider than 80 columns: \(wide.prefix(3))")
        // The text as one line: words hyphenated at a line's end joined again.
        let text = lines.map { $0.trimmingCharacters(in: .whitespaces) }.joined(separator: "\n")
            .replacing("\u{2010}\n", with: "").replacing("\n", with: " ")
        let dump = try JSONHelpers.parse(try QBackupBinary.run(["--experimental-dump-help"]).stdout) as? [String: Any]
        let tree = try #require(dump?["command"] as? [String: Any])
        let commands = Self.commands(tree)
        #expect(commands.count >= 23, "\(commands.map(\.path))")
        for command in commands where !command.path.isEmpty {
            let label = command.path.joined(separator: " ")
            #expect(source.contains(".It Em \(command.path.last ?? "")\n"), "\(label): no entry")
            let words = command.abstract.split(separator: " ").prefix(4).joined(separator: " ")
            #expect(text.contains(words), "\(label): abstract '\(words)' missing")
            for option in command.options {
                #expect(text.contains("--\(option)"), "\(label): --\(option) missing")
            }
        }
        // A discussion's example command stays on a line of its own (not filled into the paragraph).
        #expect(lines.contains { $0.trimmingCharacters(in: .whitespaces).hasPrefix("0 2 * * * qbackup backup --qmp") }, "no cron example line")
    }
}
