import Foundation
import Testing
import TestSupport

/// Issue 17 item 5: a live backup's warnings are qbackup's own `qbackup: warning:` lines and,
/// with `--output json`, the report's `"warnings"` (DESIGN "Command line"), not a `"notes"`
/// array beside a second copy in swift-log's format; why a layer is full is `"reason"`.
@Suite struct QMPReportTests {
    static func warningLines(_ stderr: String) -> [String] {
        stderr.split(separator: "\n").filter { $0.hasPrefix("qbackup: warning: ") }
            .map { String($0.dropFirst("qbackup: warning: ".count)) }
    }

    /// The warning: a NAME.frozen that an interrupted backup left in QEMU, merged back.
    @Test func warningsAreInTheReport() throws {
        let s = try LiveScenario("live-report")
        try s.write(0x31, at: 0, length: 1 << 20)
        try s.startVM()
        let vm = try #require(s.vm)
        let first = try s.backup()
        let name = try #require(first["bitmap"] as? String)
        for (round, json) in [(0, true), (1, false)] {
            try vm.monitor.execute("block-dirty-bitmap-add", ["node": vm.node, "name": "\(name).frozen", "persistent": true])
            try s.write(UInt8(0x40 + round), at: (2 + round) << 20, length: 64 << 10)
            let result = try QBackupBinary.run(["backup", "--qmp", vm.qmpSocket, "--repo", s.repo]
                                               + (json ? ["--output", "json"] : []))
            #expect(result.status == 0, "\(result.stderr)")
            let lines = Self.warningLines(result.stderr)
            #expect(lines.count == 1 && lines.first?.contains("merged bitmap '\(name).frozen'") == true, "\(result.stderr)")
            // Said once, in qbackup's words: no swift-log line, no note repeating it.
            #expect(result.stderr.components(separatedBy: "merged bitmap").count == 2, "\(result.stderr)")
            if json {
                let report = try #require(try JSONHelpers.parse(result.stdout) as? [String: Any], "\(result.stdout)")
                #expect(report["warnings"] as? [String] == lines, "\(report)")
                #expect(report["notes"] == nil, "\(report)")
                #expect(report["kind"] as? String == "incremental" && report["bytes-copied"] as? Int == 64 << 10, "\(report)")
                if let index = report["index"] as? Int { s.points[index] = s.model }
            }
        }
        #expect(try vm.bitmaps()["\(name).frozen"] == nil)
        try s.checkNothingLeft()
        try s.checkEveryPoint()
    }
}
