import ArgumentParser
import Foundation
import Logging

/// `--output human|json`, shared by every command that reports.
enum OutputFormat: String, ExpressibleByArgument, CaseIterable {
    case human, json
}

/// Flags shared by the commands: output format, progress bar, verbosity.
struct GlobalOptions: ParsableArguments {
    @Option(name: .long, help: "Output format: human or json (JSON goes to stdout).")
    var output: OutputFormat = .human

    @Flag(name: [.short, .long], inversion: .prefixedNo,
          help: "Draw a progress bar on stderr (default: on when stderr is a terminal).")
    var progress: Bool?

    @Flag(name: .long, help: "Log debug details to stderr.")
    var verbose = false

    var json: Bool { output == .json }

    /// A logger to stderr: debug with --verbose, else warnings only.
    var logger: Logger {
        var logger = Logger(label: "qbackup") { StreamLogHandler.standardError(label: $0) }
        logger.logLevel = verbose ? .debug : .warning
        return logger
    }

    /// A progress reporter, or nil when progress is off.
    func progressReporter(_ label: String) -> ProgressReporter? {
        let on = progress ?? (isatty(STDERR_FILENO) != 0)
        return on ? ProgressReporter(label: label) : nil
    }
}
