import Foundation
import Testing
import TestSupport

/// What README promises an admin, checked against the code.
@Suite struct ReadmeTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()

    /// Every exit status the tool uses has a row in README's exit-status table, with what to do.
    @Test func everyExitStatusIsDocumented() throws {
        let readme = try String(contentsOf: Self.root.appendingPathComponent("README.md"), encoding: .utf8)
        let section = (readme.components(separatedBy: "### Exit statuses").dropFirst().first ?? "")
            .components(separatedBy: "\n#").first ?? ""
        let rows = section.split(separator: "\n").filter { $0.hasPrefix("| ") }
        let statuses = Set(rows.compactMap { Int($0.split(separator: "|").first?.trimmingCharacters(in: .whitespaces) ?? "") })
        // The statuses ExitStatus.swift defines, plus check's 3 (qemu-img check's "leaks only").
        let source = try String(contentsOf: Self.root.appendingPathComponent("Sources/qbackup/ExitStatus.swift"),
                                encoding: .utf8)
        var used: Set<Int> = [3]
        for line in source.split(separator: "\n") where line.contains("static let") && line.contains(": Int32 =") {
            if let value = line.split(separator: "=").last.flatMap({ Int($0.trimmingCharacters(in: .whitespaces)) }) {
                used.insert(value)
            }
        }
        #expect(used.isSuperset(of: [0, 1, 2, 3, 75]), "\(used)")
        #expect(statuses == used, "README documents \(statuses.sorted()), the code uses \(used.sorted())")
        for row in rows {
            #expect(row.split(separator: "|").count >= 3, "a row without advice: \(row)")
        }
    }
}
